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

/** Schedules `fire` in `ms`; must not keep the process alive. */
export type Schedule = (fire: () => void, ms: number) => void

function unrefTimeout (fire: () => void, ms: number): void {
  setTimeout(fire, ms).unref()
}

/** The most kinds told apart under one message; beyond, they share the message's line. */
const KINDS_PER_MESSAGE = 8

interface Seen { notice: TroubleNotice, repeats: number, last: { log: WarnLog, fields: object } | null, pending: boolean }

/**
 * A warning that every request would repeat while what it reports lasts (the session store or the
 * identity provider unreachable): written the first time, then at most once per interval for each
 * message (and `kind`, e.g. the error's type, so that another failure under the same message is
 * told as itself), saying how many were left out since (`repeats`). The ones left out are told when
 * their interval ends even if none follows (never charged to a line days later). Only the
 * service's own fixed messages go through it, and at most KINDS_PER_MESSAGE kinds each, so the map
 * stays as small as that set.
 */
export class RepeatedWarnings {
  readonly #everyMs: number
  readonly #now: () => number
  readonly #schedule: Schedule
  readonly #seen = new Map<string, Seen>()
  readonly #kinds = new Map<string, number>()

  constructor (everyMs: number, now: () => number, schedule: Schedule = unrefTimeout) {
    this.#everyMs = everyMs
    this.#now = now
    this.#schedule = schedule
  }

  warn (log: WarnLog, fields: object, message: string, kind = ''): void {
    const seen = this.#entry(message, kind)
    if (!seen.notice.tell()) {
      seen.repeats++
      seen.last = { log, fields }
      if (!seen.pending) this.#flushLater(seen, message)
      return
    }
    this.#write(seen, log, fields, message)
  }

  #entry (message: string, kind: string): Seen {
    let key = `${message}\0${kind}`
    if (kind !== '' && !this.#seen.has(key)) {
      const kinds = this.#kinds.get(message) ?? 0
      if (kinds >= KINDS_PER_MESSAGE) key = `${message}\0`
      else this.#kinds.set(message, kinds + 1)
    }
    let seen = this.#seen.get(key)
    if (seen === undefined) {
      seen = { notice: new TroubleNotice(this.#everyMs, this.#now), repeats: 0, last: null, pending: false }
      this.#seen.set(key, seen)
    }
    return seen
  }

  /** The interval of a left-out warning ended: its count is told, unless a line told it meanwhile. */
  #flush (seen: Seen, message: string): void {
    seen.pending = false
    if (seen.last === null) return
    if (!seen.notice.tell()) {
      this.#flushLater(seen, message)
      return
    }
    this.#write(seen, seen.last.log, seen.last.fields, message)
  }

  /** The count left out is told when the interval ends (#flush), by one timer at a time. */
  #flushLater (seen: Seen, message: string): void {
    seen.pending = true
    this.#schedule(() => { this.#flush(seen, message) }, this.#everyMs)
  }

  #write (seen: Seen, log: WarnLog, fields: object, message: string): void {
    log.warn(seen.repeats === 0 ? fields : { ...fields, repeats: seen.repeats }, message)
    seen.repeats = 0
    seen.last = null
  }
}
