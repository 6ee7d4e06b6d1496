import type { IncomingHttpHeaders } from 'node:http'
import { performance } from 'node:perf_hooks'
import { Pool, type Dispatcher } from 'undici'
import { ApiError, ErrorCode, OwnError, type ApiErrorOptions } from '../errors.js'
import { isPromise, type Awaitable } from '../state/awaitable.js'

/**
 * The one module that talks to the Care360 Next API. The organization key is attached here and
 * nowhere else, and every upstream outcome is mapped here to a row of the contract's answer table.
 * It never logs: callers log the coded error it throws, whose messages never carry the key, the
 * patient's email or the cancellation reason.
 */

export type UpstreamEndpoint = 'cancel' | 'list'

/** How an upstream call ended, as metrics name it: one per coded error of the answer table. */
export type UpstreamCallOutcome = 'ok' | 'rejected' | 'auth_failed' | 'rate_limited' | 'error' | 'unavailable' | 'timeout'

/**
 * The org budget and the shared cooldown, implemented elsewhere. `acquire` runs before every
 * upstream call and may throw an ApiError (429 UPSTREAM_RATE_LIMITED) so that no call is made.
 * `onRateLimited` hears about every upstream 429; it may return the cooldown it decided (in ms),
 * which then becomes the client's Retry-After.
 */
export interface UpstreamGate {
  acquire (endpoint: UpstreamEndpoint): Awaitable<void>
  onRateLimited (retryAfterMs: number | null): Promise<number | undefined | void>
  /**
   * Throws the 429 at once when the gate already knows the call cannot go (a cooldown it holds),
   * before the call waits for a connection; `acquire` still decides for the calls it lets by.
   */
  refuseNow? (): void
}

export const openGate: UpstreamGate = {
  acquire () {},
  async onRateLimited () {}
}

export interface Care360ClientOptions {
  /** Origin of the upstream (config.ts refuses a path: the API's paths are added here). */
  baseUrl: string
  apiKey: string
  /** Deadline of one upstream call, from its wait for a connection to the last byte of the answer. */
  timeoutMs: number
  gate?: UpstreamGate
  /** Answers to a cancel larger than this are refused (502); default 64 KiB. */
  maxBodyBytes?: number
  /**
   * Answers to Fetch Appointments larger than this are refused (502); default 1 MiB, about 500 to
   * 2000 appointments. The list is not paginated (its documentation): a patient's whole list comes
   * in one body, about 500 bytes to 2 KB an appointment, so a cap of a cancel's size failed every
   * patient with more than about a hundred, their list and every cancel's ownership check alike.
   */
  maxListBodyBytes?: number
  /** Keep-alive sockets to the upstream; default 10. */
  connections?: number
  /**
   * Requests a connection carries before it is closed (the last one says `Connection: close`) and
   * a new one made; default 1000, at least 2. A busy service never lets its connections go idle, so without a
   * bound it would never look up the upstream's address again: a move of the upstream's endpoint
   * (a blue/green switch, a load balancer's new addresses) would reach it only when the old
   * address stopped answering.
   */
  requestsPerConnection?: number
  /**
   * How sockets are made: undici's own connector, with half the deadline as its timeout, unless a
   * test slows connecting down (the order of a deadline and a connection is the event loop's).
   */
  connect?: Pool.Options['connect']
  /**
   * Hears about every call that passed the gate, when it ends: its outcome and its duration from
   * dispatch to the answer mapped (seconds); and every call that got no connection by its
   * deadline (`timeout`, timed from its start). Calls the gate stopped never left, and are not heard.
   */
  observe?: (endpoint: UpstreamEndpoint, outcome: UpstreamCallOutcome, seconds: number) => void
}

export interface CancelRequest {
  email: string
  appointmentId: string
  reason?: string
}

export interface CallContext {
  requestId: string
}

export interface CancelAnswer {
  status: 200
  success: true
  message: string
}

/** An upcoming appointment, trimmed to what a patient app needs. */
export interface Appointment {
  id: string
  agentEventId: string | null
  title: string | null
  topic: string | null
  start: string | null
  end: string | null
  status: string | null
  agentName: string | null
}

export interface Care360Client {
  cancelAppointment (request: CancelRequest, context: CallContext): Promise<CancelAnswer>
  fetchAppointments (email: string, context: CallContext): Promise<Appointment[]>
  close (): Promise<void>
}

/**
 * Whether the upstream may have acted on the request: `not-sent` (it never left this process, safe
 * to say nothing happened), `unknown` (sent, but the answer was lost or late: a cancel may have
 * happened) or `answered` (the upstream answered, whatever it said).
 */
export type UpstreamOutcome = 'not-sent' | 'unknown' | 'answered'

export interface UpstreamErrorOptions extends ApiErrorOptions {
  outcome: UpstreamOutcome
  upstreamStatus: number | null
}

export class UpstreamError extends ApiError {
  readonly outcome: UpstreamOutcome
  readonly upstreamStatus: number | null

  constructor (statusCode: number, code: ErrorCode, message: string, options: UpstreamErrorOptions) {
    super(statusCode, code, message, options)
    this.name = 'UpstreamError'
    this.outcome = options.outcome
    this.upstreamStatus = options.upstreamStatus
  }
}

const DEFAULT_MAX_BODY_BYTES = 64 * 1024
const DEFAULT_MAX_LIST_BODY_BYTES = 1024 * 1024
const MAX_RETRY_AFTER_MS = 10 * 60_000
const MAX_TEXT = 300
const CANCEL_PATH = '/api/v1/calendar/appointments/cancel'
const LIST_PATH = '/api/v1/calendar/appointments'

/** Raised (as a cause) when the upstream answers more than maxBodyBytes. */
class BodyTooLargeError extends OwnError {
  readonly code = 'CARE360_BODY_TOO_LARGE'
}

/** Raised (as a cause) when our own deadline passes. */
class DeadlineError extends OwnError {
  readonly code = 'CARE360_DEADLINE'
}

interface Answer {
  status: number
  headers: IncomingHttpHeaders
  body: Buffer
}

/**
 * Failure of one exchange. `sent` is true once undici handed the request to a connected socket
 * (onRequestStart fires in writeH1 right before the first byte is written); any error before that
 * (refused, DNS, TLS, connect timeout, waiting for a free socket) means the upstream never saw it.
 */
class ExchangeError extends Error {
  readonly sent: boolean
  readonly timedOut: boolean
  /** The answer's status when its headers had arrived, else null. */
  readonly status: number | null
  constructor (cause: Error, sent: boolean, timedOut: boolean, status: number | null) {
    super('upstream exchange failed', { cause })
    this.sent = sent
    this.timedOut = timedOut
    this.status = status
  }
}

const NO_BODY = Buffer.alloc(0)

// undici's own deadlines are a safety net behind ours; they mean the same thing.
const TIMEOUT_CODES = new Set(['UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT'])

/**
 * One request through the pool with a raw dispatch handler: it lets us see whether the request
 * reached a socket, cap the body while it streams, and abort on our deadline. Every path ends by
 * reading the body to the end (socket back to the pool) or aborting (socket destroyed). A class
 * rather than a handler of closures: one object per call.
 */
class Exchange implements Dispatcher.DispatchHandler {
  readonly answer: Promise<Answer>
  #resolve!: (answer: Answer) => void
  #reject!: (error: ExchangeError) => void
  #controller: Dispatcher.DispatchController | null = null
  #settled = false
  #status = 0
  #headers: IncomingHttpHeaders = {}
  readonly #chunks: Buffer[] = []
  #size = 0
  readonly #maxBodyBytes: number
  readonly #timer: NodeJS.Timeout

  constructor (timeoutMs: number, maxBodyBytes: number) {
    this.answer = new Promise((resolve, reject) => {
      this.#resolve = resolve
      this.#reject = reject
    })
    this.#maxBodyBytes = maxBodyBytes
    this.#timer = setTimeout(onDeadline, timeoutMs, this, timeoutMs)
  }

  fail (error: Error, timedOut = false): void {
    if (this.#settled) return
    this.#settled = true
    clearTimeout(this.#timer)
    this.#reject(new ExchangeError(error, this.#controller !== null, timedOut, this.#status === 0 ? null : this.#status))
    this.#controller?.abort(error)
  }

  onRequestStart (controller: Dispatcher.DispatchController): void {
    // Our deadline passed while the request waited for a socket: it must never be written. Thrown,
    // not `controller.abort`: undici then drops the request and hands the socket, healthy and
    // unused, to the next one, where an abort destroys it (a new TCP and TLS handshake for every
    // expired request leaving the queue, when the upstream is already slow).
    if (this.#settled) throw new DeadlineError('deadline passed before sending')
    this.#controller = controller
  }

  onResponseStart (_controller: Dispatcher.DispatchController, statusCode: number, headers: IncomingHttpHeaders): void {
    // An informational answer (a 102, a 103 with its hints) is not the answer: undici hands it
    // here too, and the final one follows.
    if (statusCode < 200) return
    this.#status = statusCode
    this.#headers = headers
    // A 429 is decided by its status and Retry-After, both in hand now: settled at once, its body
    // not read. One too large, too slow or cut off would otherwise be a 502 or a 504, which set no
    // cooldown, and one that stalled held the patient, and the shared cooldown's start, until the
    // deadline. Its connection goes (a 429 is rare behind the org budget).
    if (statusCode === 429) {
      this.#settled = true
      clearTimeout(this.#timer)
      this.#resolve({ status: 429, headers, body: NO_BODY })
      this.#controller?.abort(new OwnError('a 429 is read from its headers'))
      return
    }
    const declared = Number(headers['content-length'])
    if (declared > this.#maxBodyBytes) this.fail(new BodyTooLargeError(`declared body of ${declared} bytes`))
  }

  onResponseData (_controller: Dispatcher.DispatchController, chunk: Buffer): void {
    this.#size += chunk.length
    if (this.#size > this.#maxBodyBytes) {
      this.fail(new BodyTooLargeError(`body over ${this.#maxBodyBytes} bytes`))
      return
    }
    this.#chunks.push(chunk)
  }

  onResponseEnd (): void {
    /* c8 ignore next -- an abort after settling ends with onResponseError, not here */
    if (this.#settled) return
    this.#settled = true
    clearTimeout(this.#timer)
    const chunks = this.#chunks
    this.#resolve({ status: this.#status, headers: this.#headers, body: chunks.length === 1 ? chunks[0] as Buffer : Buffer.concat(chunks) })
  }

  onResponseError (_controller: Dispatcher.DispatchController, error: Error): void {
    const timedOut = TIMEOUT_CODES.has(String((error as NodeJS.ErrnoException).code))
    this.fail(error, timedOut)
  }
}

function onDeadline (exchange: Exchange, timeoutMs: number): void {
  exchange.fail(new DeadlineError(`no complete answer within ${timeoutMs} ms`), true)
}

interface SlotWaiter {
  resolve: () => void
  timer: NodeJS.Timeout
  expired: boolean
}

/**
 * The pool's connections, as slots a call holds from before the org budget admits it until its
 * answer is in: admitted, a call leaves at once on a socket of its own. Admitted and then queued
 * in the pool for a socket, it could leave seconds later, when the budget's window had moved on,
 * and the upstream would receive more calls in some interval than the budget allows (20 calls held
 * 1.5 s for a socket and 19 more admitted 10 s after them: 29 in one 10 s interval, against 20).
 * First come, first served; a call that gets no slot by its deadline is never sent.
 */
class Slots {
  #free: number
  readonly #waiting: SlotWaiter[] = []

  constructor (count: number) {
    this.#free = count
  }

  /** Nothing when a slot is free (taken at once), else a promise of one, rejected after `timeoutMs`. */
  take (timeoutMs: number): Promise<void> | undefined {
    if (this.#free > 0) {
      this.#free--
      return undefined
    }
    return new Promise((resolve, reject) => {
      const waiter: SlotWaiter = { resolve, expired: false, timer: setTimeout(expire, timeoutMs) }
      function expire (): void {
        waiter.expired = true
        reject(new DeadlineError(`no free connection within ${timeoutMs} ms`))
      }
      this.#waiting.push(waiter)
    })
  }

  /** A slot back: to the first call still waiting, else free. */
  give (): void {
    let next = this.#waiting.shift()
    while (next?.expired === true) next = this.#waiting.shift()
    if (next === undefined) {
      this.#free++
      return
    }
    clearTimeout(next.timer)
    next.resolve()
  }
}

function exchange (pool: Pool, options: Dispatcher.DispatchOptions, timeoutMs: number, maxBodyBytes: number): Promise<Answer> {
  const handler = new Exchange(timeoutMs, maxBodyBytes)
  pool.dispatch(options, handler)
  return handler.answer
}

/** asctime()'s date, the third HTTP-date form: `Sun Nov  6 08:49:37 1994`. */
const ASCTIME = /^[A-Za-z]{3} [A-Za-z]{3} [ \d]\d \d{2}:\d{2}:\d{2} \d{4}$/
/**
 * The other two HTTP-date forms (RFC 9110 5.6.7): `Sun, 06 Nov 1994 08:49:37 GMT`, `Sunday, 06-Nov-94 08:49:37 GMT`.
 * The year is group 2, what comes before and after it groups 1 and 3.
 */
const GMT_DATE = /^([A-Za-z]{3,9}, \d{2}[ -][A-Za-z]{3}[ -])(\d{2}|\d{4})( \d{2}:\d{2}:\d{2} GMT)$/

/**
 * An RFC 850 date's time, its two-digit year read by RFC 9110 5.6.7: a timestamp that appears to be
 * more than 50 years after `now` is the most recent year in the past with those digits. The rule
 * judges the timestamp, not its year alone: on 2026-12-07, 31 Dec '76 is 1976. Date.parse reads
 * 50-99 as 19xx whatever the date.
 */
function rfc850Time (head: string, twoDigits: number, tail: string, now: number): number {
  const today = new Date(now)
  // The latest year ending in them not after the year 50 years ahead: a later one is always more
  // than 50 years ahead, and within that year the date decides.
  const last = today.getUTCFullYear() + 50
  const limit = Date.UTC(last, today.getUTCMonth(), today.getUTCDate(),
    today.getUTCHours(), today.getUTCMinutes(), today.getUTCSeconds(), today.getUTCMilliseconds())
  const year = last - (last - twoDigits) % 100
  const ahead = Date.parse(`${head}${year}${tail}`)
  return ahead > limit ? Date.parse(`${head}${year - 100}${tail}`) : ahead
}

/**
 * An HTTP-date (RFC 9110 5.6.7) in ms, or null. Only its three forms: Date.parse reads nearly any
 * text with a number in it as a date ("x 3000" is the year 3000, "Retry 2" February 2001).
 * asctime's form carries no zone, and Date.parse would read it in local time: HTTP dates are all GMT.
 * `now` places a two-digit year.
 */
export function parseHttpDate (text: string, now = Date.now()): number | null {
  let at: number
  if (ASCTIME.test(text)) {
    at = Date.parse(`${text} GMT`)
  } else {
    const parts = GMT_DATE.exec(text)
    if (parts === null) return null
    const [, head, year, tail] = parts as unknown as [string, string, string, string]
    at = year.length === 2 ? rfc850Time(head, Number(year), tail, now) : Date.parse(text)
  }
  return Number.isNaN(at) ? null : at
}

/** Retry-After as seconds or HTTP-date (RFC 9110 §10.2.3), in ms, clamped; null when unusable. */
export function parseRetryAfter (value: string | string[] | undefined, now = Date.now()): number | null {
  const text = (Array.isArray(value) ? value[0] : value)?.trim()
  if (text === undefined || text === '') return null
  let ms: number
  if (/^[0-9]+$/.test(text)) {
    ms = Number(text) * 1000
  } else {
    // Any other text is no Retry-After (the cooldown backs off): a garbled header read as a far
    // date would stop every call for the clamp's 10 minutes.
    const at = parseHttpDate(text, now)
    if (at === null) return null
    ms = at - now
  }
  return Math.min(MAX_RETRY_AFTER_MS, Math.max(0, ms))
}

// Controls that separate words (tab, line feed, vertical tab, form feed, carriage return): a blank.
const BLANK_CONTROLS = /[\t\n\v\f\r]/g
// C0, DEL and C1 controls, plus bidi overrides that could disguise a message in a client's UI.
const UNSAFE = /[\u0000-\u001f\u007f-\u009f\u202a-\u202e\u2066-\u2069]/g // eslint-disable-line no-control-regex

/**
 * What an upstream text must not carry back: `anywhere`, wherever it appears (the key, the
 * patient's email: long, and a leak even inside a longer token); `words`, where it stands as whole
 * words (the reason, free text of any length: a reason of "a" must not redact every letter a of
 * the message, only a standalone "a").
 */
interface Scrub { anywhere: Array<string | undefined>, words?: string | undefined }

const WORD_CHAR = /[\p{L}\p{N}]/u

function escapeRegExp (text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')
}

/** `text` with every occurrence of `secret` (case-insensitively) replaced, if it has any. */
function redact (text: string, secret: string, asWords: boolean): string {
  // The common case (not in the text) costs a search, not a compiled expression. Words may be
  // respaced, so for them the search is for the first word alone.
  const probe = asWords ? secret.split(/\s/, 1)[0] as string : secret
  if (!text.toLowerCase().includes(probe.toLowerCase())) return text
  // Whole words: no letter or digit just before a match that starts with one, nor just after one
  // that ends with one ("a" is redacted in "for a visit", not in "cancelled").
  const chars = asWords ? Array.from(secret) : []
  const before = WORD_CHAR.test(chars[0] ?? '') ? '(?<![\\p{L}\\p{N}])' : ''
  const after = WORD_CHAR.test(chars.at(-1) ?? '') ? '(?![\\p{L}\\p{N}])' : ''
  // A run of blanks in free text matches any run of blanks: an echo may respace it.
  const pattern = asWords ? escapeRegExp(secret).replace(/\s+/g, '\\s+') : escapeRegExp(secret)
  return text.replace(new RegExp(`${before}${pattern}${after}`, 'giu'), '[redacted]')
}

/**
 * The spellings, other than the value itself, in which an upstream that quotes what it received
 * would quote a value we sent: percent-encoded (a query, as the list's `user_email` goes; with `+`
 * for blanks, as a form), and JSON-escaped (the request's body quoted as text: a quote, a line
 * break, a backslash escaped). Each has a `%`, a `+` or a backslash where the value has none.
 */
const ECHO_MARK = /[%+\\]/

function echoedSpellings (value: string): string[] {
  const percent = encodeURIComponent(value)
  const spellings = new Set([percent, percent.replace(/%20/g, '+'), new URLSearchParams([['', value]]).toString().slice(1), JSON.stringify(value).slice(1, -1)])
  spellings.delete(value)
  return [...spellings]
}

/** `text` with `secret`'s echoed spellings redacted, when it has the marks of any (`echoes`). */
function redactEchoes (text: string, secret: string, asWords: boolean, echoes: boolean): string {
  if (!echoes) return text
  for (const spelling of echoedSpellings(secret)) text = redact(text, spelling, asWords)
  return text
}

/**
 * Upstream text made safe to pass to a client and into logs: known secrets and personal data
 * (see `Scrub`) removed, as sent and in the spellings an echo gives them (`echoedSpellings`),
 * controls stripped, length capped.
 */
function safeText (value: unknown, scrub: Scrub): string | undefined {
  if (typeof value !== 'string') return undefined
  let text = value.replace(BLANK_CONTROLS, ' ').replace(UNSAFE, '')
  // The common case (a message that quotes nothing encoded) spells nothing out.
  const echoes = ECHO_MARK.test(text)
  for (const secret of scrub.anywhere) {
    if (secret !== undefined && secret !== '') text = redactEchoes(redact(text, secret, false), secret, false, echoes)
  }
  // A reason of blanks alone identifies nothing (and would redact every space, or every `+` of its
  // encoded spelling).
  const sent = scrub.words
  if (sent !== undefined && sent.trim() !== '') {
    // Encoded as it was sent, blanks and all (an echo spells them `%20` or `+`, which no word
    // boundary would find): none of its characters is a control any more.
    text = redactEchoes(text, sent, true, echoes)
    // As sent, matched as the text now reads, its controls turned into blanks or stripped like
    // the text's (a reason with a line break, echoed, would otherwise never match); blanks around
    // it are not part of it.
    const words = sent.replace(BLANK_CONTROLS, ' ').replace(UNSAFE, '').trim()
    if (words !== '') text = redact(text, words, true)
  }
  text = text.trim()
  if (text === '') return undefined
  // Counted in code points; no more code points than UTF-16 units, so a short text is whole.
  if (text.length <= MAX_TEXT) return text
  const chars = Array.from(text)
  return chars.length > MAX_TEXT ? `${chars.slice(0, MAX_TEXT - 1).join('')}…` : text
}

type Envelope = Record<string, unknown>

function parseEnvelope (body: Buffer): Envelope | null {
  try {
    // RFC 8259, 8.1: a parser may ignore a byte order mark; Buffer's decoding keeps it.
    const text = body.toString('utf8')
    const value: unknown = JSON.parse(text.charCodeAt(0) === 0xfeff ? text.slice(1) : text)
    return typeof value === 'object' && value !== null && !Array.isArray(value) ? value as Envelope : null
  } catch {
    return null
  }
}

/**
 * The statuses a NotFoundError may come with (404 inferred, the others seen on APIs of its kind).
 * Never 401 or 403: a refused key is the operator's to mend, never an empty list.
 */
const NOT_FOUND_STATUSES: ReadonlySet<number> = new Set([400, 404, 409, 410, 422])

/**
 * Whether an error envelope names the upstream's NotFoundError (the documentation names the error,
 * not the field that carries it): a field that is exactly that name, not a message that mentions
 * it (an "ApiKeyNotFoundError" or "CaseNotFoundError" is another error).
 */
function namesNotFound (envelope: Envelope | null): envelope is Envelope {
  if (envelope === null || envelope.success !== false) return false
  return [envelope.error, envelope.code, envelope.name, envelope.message].includes('NotFoundError')
}

/** The appointment's end (ms epoch), when the upstream gave a readable one. */
export function endOf (item: Appointment): number | null {
  const end = Date.parse(String(item.end))
  return Number.isNaN(end) ? null : end
}

/** Whether the appointment's end, when the upstream gave a readable one, has passed. */
export function hasEnded (item: Appointment, at: number): boolean {
  const end = endOf(item)
  return end !== null && end <= at
}

/** A cancelled status, in either spelling the vendor's pages use. */
const CANCELLED = /^cancell?ed$/i

function stringOrNull (value: unknown): string | null {
  return typeof value === 'string' ? value : null
}

function toAppointment (item: unknown): Appointment | null {
  if (typeof item !== 'object' || item === null) return null
  const raw = item as Record<string, unknown>
  if (typeof raw.id !== 'string' || raw.id === '') return null
  // The list holds neither deleted nor cancelled appointments, its documentation says: one that
  // shows up anyway is not offered to the patient, nor taken for theirs to cancel.
  if (raw.isDeleted === true || (typeof raw.status === 'string' && CANCELLED.test(raw.status))) return null
  return {
    id: raw.id,
    agentEventId: stringOrNull(raw.agentEventId),
    title: stringOrNull(raw.title),
    topic: stringOrNull(raw.topic),
    // The vendor's pages disagree on these names (start/end here, *DateTime in webhooks).
    start: stringOrNull(raw.start) ?? stringOrNull(raw.startDateTime),
    end: stringOrNull(raw.end) ?? stringOrNull(raw.endDateTime),
    status: stringOrNull(raw.status),
    agentName: stringOrNull(raw.agentName)
  }
}

/**
 * An answer that is no row of the documentation's. A 2xx to a cancel (`method` POST) whose body is
 * not the documented success (not JSON, over the cap, `success` not true, a 202 or a 204) says the
 * upstream took the request: the cancel may well have happened, as when such an answer is cut off
 * mid-body, so its outcome is unknown, never an answer to replay (a retry with its Idempotency-Key
 * asks the upstream's list, and confirms a cancel it finds done).
 */
function unexpected (status: number, why: string, method = 'GET'): UpstreamError {
  const taken = method === 'POST' && status >= 200 && status < 300
  return new UpstreamError(502, ErrorCode.UPSTREAM_ERROR, taken
    ? 'The appointment service gave an unexpected answer; whether the change was applied is unknown'
    : 'The appointment service gave an unexpected answer', {
    outcome: taken ? 'unknown' : 'answered',
    upstreamStatus: status,
    cause: new OwnError(`Care360 answered HTTP ${status}: ${why}`)
  })
}

function appointmentNotFound (status: number): UpstreamError {
  return new UpstreamError(404, ErrorCode.APPOINTMENT_NOT_FOUND, 'No such upcoming appointment', {
    outcome: 'answered',
    upstreamStatus: status,
    cause: new OwnError(`Care360 answered HTTP ${status}: NotFoundError`)
  })
}

const OUTCOME_OF_CODE: Readonly<Record<string, UpstreamCallOutcome>> = {
  [ErrorCode.UPSTREAM_REJECTED]: 'rejected',
  [ErrorCode.APPOINTMENT_NOT_FOUND]: 'rejected',
  [ErrorCode.UPSTREAM_AUTH_FAILED]: 'auth_failed',
  [ErrorCode.UPSTREAM_RATE_LIMITED]: 'rate_limited',
  [ErrorCode.UPSTREAM_ERROR]: 'error',
  [ErrorCode.UPSTREAM_UNAVAILABLE]: 'unavailable',
  [ErrorCode.UPSTREAM_TIMEOUT]: 'timeout'
}

/** Everything thrown past the gate is one of our UpstreamErrors, each with one of these codes. */
function outcomeOf (error: unknown): UpstreamCallOutcome {
  return OUTCOME_OF_CODE[(error as UpstreamError).code] as UpstreamCallOutcome
}

/** The socket's own failures: the connection closed or reset under a request. */
const CONNECTION_LOST_CODES = new Set(['UND_ERR_SOCKET', 'ECONNRESET', 'EPIPE'])

/** Whether the request was written and its connection then lost before any answer began. */
function lostBeforeAnswer (error: ExchangeError): boolean {
  return error.sent && !error.timedOut && error.status === null &&
    CONNECTION_LOST_CODES.has(String((error.cause as NodeJS.ErrnoException).code))
}

function transportError (error: ExchangeError, method: string): UpstreamError {
  const cause = error.cause
  if (!error.sent) {
    if (error.timedOut) {
      return new UpstreamError(504, ErrorCode.UPSTREAM_TIMEOUT, 'The appointment service did not answer in time', {
        outcome: 'not-sent', upstreamStatus: null, cause
      })
    }
    return new UpstreamError(502, ErrorCode.UPSTREAM_UNAVAILABLE, 'The appointment service could not be reached', {
      outcome: 'not-sent', upstreamStatus: null, cause
    })
  }
  if (cause instanceof BodyTooLargeError) return unexpected(error.status as number, cause.message, method)
  // A cancel that was sent may have happened; say so rather than guess.
  const unknown = method === 'POST' ? '; whether the change was applied is unknown' : ''
  if (error.timedOut) {
    return new UpstreamError(504, ErrorCode.UPSTREAM_TIMEOUT, `The appointment service did not answer in time${unknown}`, {
      outcome: 'unknown', upstreamStatus: null, cause
    })
  }
  // Lost while the answer's body arrived: its status stays on the record (the audit's), though
  // the answer is not known whole.
  return new UpstreamError(502, ErrorCode.UPSTREAM_ERROR, `The connection to the appointment service was lost${unknown}`, {
    outcome: 'unknown', upstreamStatus: error.status, cause
  })
}

export function createCare360Client (options: Care360ClientOptions): Care360Client {
  const base = new URL(options.baseUrl)
  const gate = options.gate ?? openGate
  const maxBodyBytes = options.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES
  const maxListBodyBytes = options.maxListBodyBytes ?? DEFAULT_MAX_LIST_BODY_BYTES
  const { apiKey, timeoutMs, observe } = options
  let closing: Promise<void> | null = null
  const connections = options.connections ?? 10
  const slots = new Slots(connections)
  const pool = new Pool(base.origin, {
    connections,
    pipelining: 1,
    // undici closes a connection on the request after its count: one fewer carries exactly ours.
    maxRequestsPerClient: Math.max(1, (options.requestsPerConnection ?? 1000) - 1),
    // Half the deadline for TCP + TLS: an upstream that cannot be reached answers "unavailable"
    // instead of running into the overall deadline. undici runs this timer on a tick of ~0.5 s,
    // so it fires up to about half a second off: with a deadline of a second or less, the
    // overall deadline can come first (504, still "never sent").
    connect: options.connect ?? { timeout: Math.max(1, Math.ceil(timeoutMs / 2)) },
    headersTimeout: timeoutMs,
    bodyTimeout: timeoutMs
  })

  /**
   * One upstream call: a connection's slot, the gate, then the exchange, then `read` turning the
   * answer into a result (it throws on an answer it cannot use). One deadline, CV_TIMEOUT_MS, from
   * the first step to the answer. The observer hears the outcome of the wait for a slot, exchange
   * and read. A promise always, also when the gate refuses at once.
   */
  function call<T> (endpoint: UpstreamEndpoint, request: Dispatcher.DispatchOptions, scrub: Scrub, read: (status: number, envelope: Envelope | null) => T): Promise<T> {
    try {
      gate.refuseNow?.()
    } catch (error) {
      return Promise.reject(error)
    }
    const started = performance.now()
    const slot = slots.take(timeoutMs)
    if (slot === undefined) return admit(endpoint, request, scrub, read, started, false)
    return slot.then(() => admit(endpoint, request, scrub, read, started, false), function noSlot (error: DeadlineError): never {
      const mapped = transportError(new ExchangeError(error, false, true, null), request.method)
      observe?.(endpoint, outcomeOf(mapped), (performance.now() - started) / 1000)
      throw mapped
    })
  }

  /**
   * With a slot held: the gate, then the exchange; the slot goes back when the exchange settles, or
   * at once when none starts. `resent`: this is a GET's second sending (send).
   */
  function admit<T> (endpoint: UpstreamEndpoint, request: Dispatcher.DispatchOptions, scrub: Scrub, read: (status: number, envelope: Envelope | null) => T, started: number, resent: boolean): Promise<T> {
    let gated: Awaitable<void>
    try {
      gated = gate.acquire(endpoint)
    } catch (error) {
      slots.give()
      return Promise.reject(error)
    }
    if (!isPromise(gated)) return send(endpoint, request, scrub, read, started, resent)
    return gated.then(() => send(endpoint, request, scrub, read, started, resent), function refused (error: unknown): never {
      slots.give()
      throw error
    })
  }

  function send<T> (endpoint: UpstreamEndpoint, request: Dispatcher.DispatchOptions, scrub: Scrub, read: (status: number, envelope: Envelope | null) => T, started: number, resent: boolean): Promise<T> {
    const sentAt = performance.now()
    function heard (outcome: UpstreamCallOutcome): void {
      observe?.(endpoint, outcome, (performance.now() - sentAt) / 1000)
    }
    // What is left of the call's deadline after the waits for a slot and the gate (a Redis round
    // trip): under a millisecond, the call is not sent.
    const leftMs = Math.floor(timeoutMs - (sentAt - started))
    if (leftMs < 1) {
      slots.give()
      const mapped = transportError(new ExchangeError(new DeadlineError(`deadline passed before sending (${timeoutMs} ms)`), false, true, null), request.method)
      heard(outcomeOf(mapped))
      return Promise.reject(mapped)
    }
    return exchange(pool, request, leftMs, endpoint === 'list' ? maxListBodyBytes : maxBodyBytes).then(function answered (answer): T | Promise<T> {
      slots.give()
      if (answer.status === 429) {
        return rateLimited(answer.headers).catch(function heardRateLimited (error: unknown): never {
          heard('rate_limited')
          throw error
        })
      }
      try {
        const result = read(answer.status, usableEnvelope(answer, scrub, request.method))
        heard('ok')
        return result
      } catch (error) {
        heard(outcomeOf(error))
        throw error
      }
    }, function failed (error: unknown): Promise<T> {
      const mapped = transportError(error as ExchangeError, request.method)
      heard(outcomeOf(mapped))
      // A GET whose connection was lost before any answer is sent once more, on the slot it holds,
      // through the gate (another upstream call) and within what is left of its deadline: the
      // kept-alive connection the upstream closes just as a request is written on it (its idle
      // timer, a restart) is a race undici's check of an idle socket cannot see, and its core
      // never sends anything again. A cancel never is: it may have been read.
      if (!resent && request.method === 'GET' && lostBeforeAnswer(error as ExchangeError)) {
        return admit(endpoint, request, scrub, read, started, true)
      }
      slots.give()
      throw mapped
    })
  }

  /**
   * The envelope of an answer `read` may use (200, 404, and a NotFoundError under one of
   * NOT_FOUND_STATUSES); any other status is a coded error.
   */
  function usableEnvelope (answer: Answer, scrub: Scrub, method: string): Envelope | null {
    const { status } = answer
    const envelope = parseEnvelope(answer.body)
    if (status === 200 || status === 404) return envelope
    if (NOT_FOUND_STATUSES.has(status) && namesNotFound(envelope)) return envelope
    if (status === 400) {
      if (envelope === null) throw unexpected(status, 'a 400 without a JSON envelope (an intermediary?)')
      throw new UpstreamError(400, ErrorCode.UPSTREAM_REJECTED,
        safeText(envelope.message, scrub) ?? 'The appointment service rejected the request', {
          outcome: 'answered',
          upstreamStatus: status,
          detail: safeText(envelope.error, scrub),
          cause: new OwnError('Care360 answered HTTP 400')
        })
    }
    if (status === 401) {
      // Our organization key was refused: an operator's problem, never the patient's.
      throw new UpstreamError(502, ErrorCode.UPSTREAM_AUTH_FAILED, 'The appointment service is not available right now (service configuration problem)', {
        outcome: 'answered', upstreamStatus: status, cause: new OwnError('Care360 refused the organization key (HTTP 401)')
      })
    }
    throw unexpected(status, status >= 500 ? 'server error' : 'status not in its documentation', method)
  }

  /** An upstream 429: the gate hears of it (cooldown), and the client gets a 429 with Retry-After. */
  async function rateLimited (headers: IncomingHttpHeaders): Promise<never> {
    // A date is read against the answer's own Date (the upstream's clock), not ours: a skew
    // between the two clocks would otherwise lengthen or cut the cooldown by as much.
    const answeredAt = typeof headers.date === 'string' ? parseHttpDate(headers.date.trim()) : null
    const retryAfterMs = parseRetryAfter(headers['retry-after'], answeredAt ?? Date.now())
    let cooldownMs: number | null = retryAfterMs
    try {
      const decided = await gate.onRateLimited(retryAfterMs)
      if (typeof decided === 'number') cooldownMs = decided
    } catch {
      // The client's answer is a 429 either way; a gate that cannot record the cooldown must not
      // turn it into a 500.
    }
    const seconds = Math.max(1, Math.ceil((cooldownMs ?? 0) / 1000))
    throw new UpstreamError(429, ErrorCode.UPSTREAM_RATE_LIMITED, 'The appointment service is busy; try again later', {
      outcome: 'answered', upstreamStatus: 429, headers: { 'Retry-After': String(seconds) }, cause: new OwnError('Care360 answered HTTP 429')
    })
  }

  /** The only headers the upstream ever gets from us: the key, the request id, and the JSON body's type. */
  function upstreamHeaders (context: CallContext, jsonBody: boolean): Record<string, string> {
    return jsonBody
      ? { 'cv-api-key': apiKey, 'x-request-id': context.requestId, 'content-type': 'application/json' }
      : { 'cv-api-key': apiKey, 'x-request-id': context.requestId }
  }

  return {
    cancelAppointment ({ email, appointmentId, reason }, context) {
      const payload: CancelRequest = { email, appointmentId }
      if (reason !== undefined) payload.reason = reason
      const scrub: Scrub = { anywhere: [apiKey, email], words: reason }
      // Never retried: a cancel whose answer was lost may have happened.
      return call('cancel', {
        method: 'POST',
        path: CANCEL_PATH,
        headers: upstreamHeaders(context, true),
        body: JSON.stringify(payload),
        idempotent: false
      }, scrub, function readCancel (status, envelope): CancelAnswer {
        if (status !== 200) {
          // The upstream does not know the appointment (its NotFoundError, as for an unknown
          // email): the contract's "not found" (with OWNERSHIP_CHECK=off, the upstream's own check).
          if (namesNotFound(envelope)) throw appointmentNotFound(status)
          throw unexpected(status, 'status not in its documentation')
        }
        if (envelope === null) throw unexpected(status, 'body is not a JSON object', 'POST')
        // Matched on status and `success` (the documentation's rule): a 200 that does not say
        // success is not taken for a cancel, nor for a refusal of it either (unexpected).
        if (envelope.success !== true) throw unexpected(status, 'success is not true', 'POST')
        return {
          status: 200,
          success: true,
          message: safeText(envelope.message, scrub) ?? 'Appointment cancelled'
        }
      })
    },

    // Sent once more, once, when its connection is lost before any answer (send): the kept-alive
    // race. Any other failure is a 502 or 504 the app retries.
    fetchAppointments (email, context) {
      const query = new URLSearchParams({ user_email: email })
      return call('list', {
        method: 'GET',
        path: `${LIST_PATH}?${query.toString()}`,
        headers: upstreamHeaders(context, false)
      }, { anywhere: [apiKey, email] }, function readList (status, envelope): Appointment[] {
        if (envelope === null) throw unexpected(status, 'body is not a JSON object')
        // The upstream's "NotFoundError" for an email it does not know: no appointments. Its status
        // is not documented (404 inferred): an error envelope naming it exactly with one of
        // NOT_FOUND_STATUSES counts (usableEnvelope), and so does a 404 in the envelope. A 404
        // that is not its envelope (another server at CV_BASE_URL) stays an error rather than an empty list.
        if (status !== 200) {
          if (status !== 404 || envelope.success === false) return []
          throw unexpected(status, 'a 404 without the upstream envelope')
        }
        if (envelope.success !== true) throw unexpected(status, 'success is not true')
        if (!Array.isArray(envelope.data)) throw unexpected(status, 'data is not a list')
        const appointments: Appointment[] = []
        const now = Date.now()
        for (const item of envelope.data) {
          const appointment = toAppointment(item)
          // Only upcoming ones are listed, the documentation says: one that has ended (a readable
          // end in the past) is left out if listed anyway, from the patient's list and from the
          // ownership check, so that no cancel is sent for it.
          if (appointment !== null && !hasEnded(appointment, now)) appointments.push(appointment)
        }
        return appointments
      })
    },

    async close () {
      if (closing === null) closing = pool.close()
      await closing
    }
  }
}
