"""What the user sees when something is wrong, and files that are never left half-written.

- UserError and run_script: a wrong input, a broken file, a busy folder reach the user as one line
  `error: <file>: <what> - <fix>` on stderr and exit status 1, without a traceback (DIT_DEBUG=1 shows it). Any other
  exception is a bug and keeps its traceback. argparse's own errors (a wrong flag or value) exit with status 2.
- Argparse types for numeric flags (finite, in range), and a check that an output path can be written, so a wrong
  value stops the script before any work.
- write_atomically: a temporary file in the same folder, fsync'd and renamed, then the folder fsync'd: a file under
  its final name is always complete, even after kill -9 or a power cut. remove_temporaries clears what a killed
  writer left behind.
- lock_folder: one run per results folder, an OS lock that dies with its process (so kill -9 leaves no stale lock).
"""
import argparse
import contextlib
import fcntl
import hashlib
import math
import os
import pickle
import socket
import sys
import tempfile
import zipfile

DEBUG_VARIABLE = "DIT_DEBUG"  # DIT_DEBUG=1: show the traceback of a UserError too (for a bug report)
TEMPORARY_PREFIX = ".tmp-"  # write_atomically's files; a name starting with it is never a finished file
LOCK_FILE = ".lock"


#################################################################################
#                         Errors the user can fix                               #
#################################################################################

class UserError(ValueError):
    """A problem with the user's input or files, not with the code: "<file>: <what> - <fix>".

    A ValueError, so callers that already catch ValueError for wrong inputs keep working.
    """


# What loading a truncated, corrupt or foreign file raises: torch's zip reader (RuntimeError), the weights_only
# unpickler's refusal (UnpicklingError), numpy's and zipfile's checks, a short read (EOFError), the OS.
UNREADABLE_FILE_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, KeyError,
                          zipfile.BadZipFile)


def read_file(path, load, fix):
    """load(path), with any failure to read the file turned into a UserError naming it and `fix`."""
    try:
        return load(path)
    except UNREADABLE_FILE_ERRORS as error:
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else "no detail"
        raise UserError(f"{path}: cannot be read ({type(error).__name__}: {detail}) - {fix}") from error


def run_script(main, parse_args):
    """The `if __name__ == "__main__":` of every script: main(parse_args()), a UserError (or a FileNotFoundError, a
    path the user gave) as one `error:` line."""
    args = parse_args()
    try:
        return main(args)
    except (UserError, FileNotFoundError) as error:
        if os.environ.get(DEBUG_VARIABLE, "0") not in ("", "0"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


#################################################################################
#                     Argument types: finite, in range                          #
#################################################################################

def number_in(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a finite int or float in [low, high] ("(" / ")" where open, None: unbounded).

    argparse then reports a wrong value as "argument --flag: VALUE is not ..." with the allowed range.
    """
    noun = "an integer" if kind is int else "a finite number"
    if low is not None and high is not None:
        described = f"{noun} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None or high is not None:
        described = f"{noun} {'>' if low_open else '>='} {low:g}" if low is not None else \
            f"{noun} {'<' if high_open else '<='} {high:g}"
    else:
        described = noun

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {described}") from None
        if not math.isfinite(value) or (low is not None and (value < low or low_open and value == low)) or (
                high is not None and (value > high or high_open and value == high)):
            raise argparse.ArgumentTypeError(f"{text} is not {described}")
        return value

    parse.__name__ = described  # what argparse names in its own messages
    return parse


positive_int = number_in(int, 1)
non_negative_int = number_in(int, 0)
positive_float = number_in(float, 0, low_open=True)
non_negative_float = number_in(float, 0)
probability = number_in(float, 0, 1)
finite_float = number_in(float)


def check_output_path(parser, flag, path):
    """parser.error unless `path` can be written: not a folder, and its nearest existing parent a writable folder."""
    if os.path.isdir(path):
        parser.error(f"{flag} {path} is a folder; give a file path")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        parser.error(f"{flag} {path} cannot be written: {parent} is not a writable folder")


#################################################################################
#                      Atomic files and the results lock                        #
#################################################################################

def fsync_folder(folder):
    """Make a rename inside `folder` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path, write):
    """write(temporary) into a temporary file beside `path` (same extension), fsync it, rename it onto `path`, fsync
    the folder. A crash leaves the old file or the new one, never part of one; the temporary is removed on an error
    (after kill -9, remove_temporaries does it at the writer's next start)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=TEMPORARY_PREFIX, suffix=os.path.splitext(path)[1])
    os.close(descriptor)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes the file private; give it open()'s usual permissions
    try:
        write(temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    fsync_folder(folder)


def file_sha256(path):
    """The hex sha256 of a file's contents (what identifies a checkpoint in sample_ddp.py's and reflow_pairs.py's
    folders), read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_temporaries(folder):
    """Delete the temporary files of killed writers in `folder` (call it while holding the folder's lock)."""
    if not os.path.isdir(folder):
        return []
    removed = [name for name in sorted(os.listdir(folder)) if name.startswith(TEMPORARY_PREFIX)]
    for name in removed:
        os.remove(os.path.join(folder, name))
    return removed


@contextlib.contextmanager
def lock_folder(folder, flag):
    """Hold an exclusive lock on folder/.lock while the block runs (created with its parents if needed).

    An OS lock (flock): the kernel drops it when the process ends, however it ends, so a killed run never blocks the
    next. A second holder gets a UserError naming the folder and the process in it (pid and host, written into the
    file). flag names the option that chose the folder, for the fix.
    """
    try:
        os.makedirs(folder, exist_ok=True)
        handle = open(os.path.join(folder, LOCK_FILE), "a+")
    except OSError as error:
        raise UserError(f"{folder}: cannot be created or written ({error.strerror}) - choose another {flag}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"{folder}: in use by {holder} - wait for it to finish or stop it, or choose another "
                            f"{flag}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} ({os.path.basename(sys.argv[0]) or 'python'})\n")
        handle.flush()
        yield
