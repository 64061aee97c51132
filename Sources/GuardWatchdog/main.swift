import Watchdog

#if canImport(Glibc)
import Glibc
#endif

// `guard-watchdog`: started by guard before a suspend window (never by hand).
exit(WatchdogServer.serve())
