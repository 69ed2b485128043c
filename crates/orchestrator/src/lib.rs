//! Orchestration for data volumes: preflight checks, holders, unmount, map,
//! remount and the status file. Knows nothing of AES.
