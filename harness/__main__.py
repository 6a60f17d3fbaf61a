from harness.interrupts import install_signal_handlers
from harness.run import main

# in the launching process too: under hydra/launcher=joblib the runs execute in worker processes,
# and a SIGTERM to the launcher must reach them (harness.interrupts)
install_signal_handlers()
main()
