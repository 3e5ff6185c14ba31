"""The iCEFARM worker daemon: finds the boards on this host, keeps them healthy, runs them for
the reservations the control hands out (see docs/worker.md)."""
