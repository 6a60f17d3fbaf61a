import signal

from harness.interrupts import (install_signal_handlers, interrupt_signal, stop_idle_pool,
                                was_signalled)
from harness.run import main

# in the launching process too: under hydra/launcher=joblib the runs execute in worker processes,
# and a SIGTERM to the launcher must reach them (harness.interrupts)
install_signal_handlers()
main()
if was_signalled():  # a joblib sweep drained after a signal: its workers recorded their jobs
    stop_idle_pool()
    name = signal.Signals(interrupt_signal()).name
    print(f"sweep: INTERRUPTED by {name}; running jobs say so in their results.json, the rest "
          "did not start. Rerun the same command to resume.", flush=True)
    raise SystemExit(128 + interrupt_signal())
