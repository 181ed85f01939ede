"""One device-agnostic set-up for the scripts that run under torchrun (train.py, sample_ddp.py).

torchrun's environment variables present -> DDP (nccl on CUDA, gloo on CPU); absent -> one process on cuda if there,
else cpu. Rank 0 alone logs; teardown always runs.
"""
import logging
import os
import sys

import torch
import torch.distributed as dist


def setup_distributed():
    """(rank, world_size, device) of this process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_after_ddp():
    """Leave a finished multi-process run without the interpreter's teardown.

    Constructing DDP leaves a reference to the process group that destroy_process_group cannot drop (torch 2.14), so
    gloo's threads outlive it and meet the interpreter's teardown, which has aborted finished runs (SIGABRT,
    "terminate called without an active exception"). Everything is written and closed by then: flush and leave.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def create_logger(name, log_file, rank):
    """Rank 0 logs to the console and log_file; other ranks log nothing."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    if rank == 0:
        logger.setLevel(logging.INFO)
        formatter = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(log_file)):
            handler.setFormatter(formatter)
            logger.addHandler(handler)
    else:
        logger.addHandler(logging.NullHandler())
    return logger
