"""The CLI runner every stage script ends with: flags renamed, checked and read from --config before main runs, a
UserError printed as one line (exit 2), and a distributed run's ranks leaving together."""
import inspect
import os
import sys

import fire

from utils.core.errors import UserError
from utils.core.flags import config_flags, renamed, unknown_flags


def run_cli(main, aliases=None):
    """fire.Fire(main), except that older flag names (`aliases`: old -> current) are read as the current ones,
    a flag main does not take is refused before main runs (fire would report it only after main returned),
    a main that takes `config` reads --config=FILE's flags (utils.core.flags.config_flags), a UserError prints
    one line and exits with status 2, and a distributed run's ranks leave together (leave_process_group)."""
    quiet_dependency_notices()
    try:
        # launchers' own flag (DeepSpeed's `deepspeed` launcher, torch.distributed.launch); LOCAL_RANK says it too
        argv = [a for a in sys.argv[1:] if not a.startswith(("--local_rank=", "--local-rank="))]
        argv, problems = renamed(argv, aliases or {})
        if "config" in inspect.signature(main).parameters:  # a script that reruns a file of flags
            argv, more = config_flags(main, argv, aliases)
            problems += more
        problems += unknown_flags(main, argv, aliases)
        if problems:
            raise UserError("; ".join(problems) + "; run with --help for every flag.")
        sys.argv[1:] = argv
        fire.Fire(main)
        leave_process_group()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def leave_process_group():
    """After a distributed run (torchrun, accelerate, DeepSpeed) succeeded: every rank waits for the others, then
    tears the process group down while the interpreter is whole, as torch's docs ask. Left to the interpreter's
    exit, gloo's worker threads can abort the process ("terminate called without an active exception", pytorch
    #190489; bench/RESULTS.md, "Figures that moved out of the code"), and the launcher then kills the other ranks,
    maybe before rank 0 wrote the adapter. Not on failure: a rank that raised leaves the others in a collective."""
    torch = sys.modules.get("torch")  # a run that never imported torch has no process group
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def quiet_dependency_notices():
    """Silence two notices that every run printed and that concern our dependencies, not the user's run.

    bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" whenever it is imported
    (peft imports it, also for 16-bit runs): an optional kernel for 4-bit inference is fetched from the hub,
    and without it the built-in kernel runs. peft reads transformers' deprecated `is_gradient_checkpointing`.
    """
    import logging
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing(_enable)?` is deprecated",
                            category=FutureWarning)


def is_main_process():
    """True on rank 0, or when not distributed: only it prints summaries and writes files."""
    return int(os.environ.get("RANK", "0")) == 0
