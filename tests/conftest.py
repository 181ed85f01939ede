"""Puts the repository root on sys.path, so the tests import models, data, ... under a plain `pytest` too."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
