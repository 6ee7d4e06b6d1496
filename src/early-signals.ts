/**
 * The first module the entry point evaluates (server.ts imports it first): from here until the
 * shutdown handler is in place, SIGTERM and SIGINT end the process at once, with nothing to drain
 * (nothing listens yet). Without a handler, Node's default disposition would end it too, except
 * as PID 1, which the image runs it as (Dockerfile, CMD, no init): the kernel drops a signal that
 * PID 1 has no handler for, and a replica stopped while it starts would go on to start and serve
 * until the orchestrator's SIGKILL. Only the bundle's parse, before any of it runs, is uncovered.
 *
 * The handlers stay once the shutdown handler is in place, doing nothing then: a signal that came
 * while start-up ran without a turn of the event loop is dispatched only afterwards, and removing
 * them would have dropped it (the shutdown handler, registered by then, gets it too).
 */
let starting = true

function stopWhileStarting (): void {
  if (starting) process.exit(0)
}

process.on('SIGTERM', stopWhileStarting)
process.on('SIGINT', stopWhileStarting)

/** The shutdown handler takes over the signals (server.ts, as it installs it). */
export function startingDone (): void {
  starting = false
}
