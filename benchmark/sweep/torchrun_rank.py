"""Each rank of a sweep's torchrun run: ``torchrun ... -m vlpbench.sweep.torchrun_rank run ...`` is
``vlpbench run ...`` in a process that dies with the sweep.

torchrun starts every rank in a session of its own, so a kill of torchrun's process group misses them, and a
SIGKILLed torchrun (the end of the chain ``vlpbench.sweep.lifeline`` builds when the sweep dies) cannot stop
them: each rank ties itself to torchrun and checks that the sweep still runs
(``lifeline.tie_to_sweep_in_environment``) before anything else. Started by hand, without the sweep's pid in
the environment, it is ``vlpbench`` itself.
"""

import sys

from vlpbench.sweep.lifeline import tie_to_sweep_in_environment

if __name__ == "__main__":
    tie_to_sweep_in_environment()
    from vlpbench.cli import main

    sys.exit(main())
