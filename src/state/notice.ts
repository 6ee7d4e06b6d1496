/**
 * How a trouble that lasts (Redis unreachable, limits counting in memory) is told to operators
 * without flooding the log: a line about it at most once per interval, however often it recurs,
 * and an all-clear after every such line once it is over, so that the log never ends on a trouble
 * that has ended.
 */
export class TroubleNotice {
  readonly #everyMs: number
  readonly #now: () => number
  #toldAt = Number.NEGATIVE_INFINITY
  #clearAt = Number.NEGATIVE_INFINITY
  // Whether a line about the trouble was written since the last all-clear.
  #told = false

  constructor (everyMs: number, now: () => number) {
    this.#everyMs = everyMs
    this.#now = now
  }

  /** Whether a line about the trouble is due (none in the last interval); if so, it counts as written. */
  tell (): boolean {
    if (this.#now() - this.#toldAt < this.#everyMs) return false
    this.told()
    return true
  }

  /** A line about the trouble was written without asking `tell` (one saying more than the usual line): the usual one waits an interval. */
  told (): void {
    this.#toldAt = this.#now()
    this.#told = true
  }

  /**
   * Whether the all-clear is due, the trouble being over: always after a line about it; after a
   * break that was not told (`untoldBreak`), once per interval. If so, it counts as written.
   */
  clear (untoldBreak = false): boolean {
    // Asked after every command that Redis answered (limits/fallback.ts): one field read then.
    if (!this.#told && !untoldBreak) return false
    const at = this.#now()
    if (!this.#told && at - this.#clearAt < this.#everyMs) return false
    this.#told = false
    this.#clearAt = at
    return true
  }
}

/** Where a warning goes; Fastify's logger fits. */
export interface WarnLog {
  warn: (fields: object, message: string) => void
}

/**
 * A warning that every request would repeat while what it reports lasts (the session store or the
 * identity provider unreachable): written the first time, then at most once per interval for each
 * message, saying how many were left out since (`repeats`). Only the service's own fixed messages
 * go through it, so the map stays as small as that set.
 */
export class RepeatedWarnings {
  readonly #everyMs: number
  readonly #now: () => number
  readonly #seen = new Map<string, { notice: TroubleNotice, repeats: number }>()

  constructor (everyMs: number, now: () => number) {
    this.#everyMs = everyMs
    this.#now = now
  }

  warn (log: WarnLog, fields: object, message: string): void {
    let seen = this.#seen.get(message)
    if (seen === undefined) {
      seen = { notice: new TroubleNotice(this.#everyMs, this.#now), repeats: 0 }
      this.#seen.set(message, seen)
    }
    if (!seen.notice.tell()) {
      seen.repeats++
      return
    }
    log.warn(seen.repeats === 0 ? fields : { ...fields, repeats: seen.repeats }, message)
    seen.repeats = 0
  }
}
