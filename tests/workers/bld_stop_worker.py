"""torchrun worker: BLD at a pipeline-parallel size stopped (as if killed) after some training steps,
then `megatron-puzzle bld` resuming it in the same launch:
`bld_stop_worker.py RUN CONFIG STOP_AFTER_STEPS CLI_ARGS...`."""

import sys
from pathlib import Path


def main():
    import torch

    torch.set_num_threads(1)
    from megatron_puzzle.cli import main as cli_main
    from megatron_puzzle.distill.bld import Interrupted
    from megatron_puzzle.distill.bld_run import build_library, load_run_config
    from megatron_puzzle.model.parallel import barrier, shutdown

    run, config, stop, cli_args = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    rc = load_run_config(run, config)
    rc.bld.pipeline_parallel = int(cli_args[cli_args.index("--pp") + 1])
    rc.bld.pp_first_stage_layers = int(cli_args[cli_args.index("--pp-first-stage-layers") + 1])
    rc.bld.progress = False
    try:
        build_library(run, rc, stop_after_steps=stop)
    except Interrupted:
        pass
    else:
        raise SystemExit("BLD finished before the stop it was asked for")
    barrier()
    if (Path(run) / "library" / "done").exists() or not (Path(run) / "library" / ".partial").exists():
        raise SystemExit("the stopped run should have left partial entries and no done marker")
    rc = cli_main(["bld", "--run-dir", run, "--config", config, "--no-progress", *cli_args])
    shutdown()
    sys.exit(rc)


if __name__ == "__main__":
    main()
