import { performance } from 'node:perf_hooks'

/**
 * The clock of the stores held in this process (the memory limit stores, and the twins of the
 * Redis ones): monotonic, so that a wall clock stepped back or forth (NTP) neither stretches nor
 * ends early a window, a cooldown or the org budget's log. Near the epoch in ms, but only
 * durations of this process are compared on it: never Redis's TIME, never another wall clock.
 */
export function monotonicNow (): number {
  return performance.timeOrigin + performance.now()
}
