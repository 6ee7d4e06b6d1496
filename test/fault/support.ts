import { request as httpRequest, type IncomingHttpHeaders } from 'node:http'
import { Writable } from 'node:stream'
import type { AddressInfo } from 'node:net'
import type { Test } from 'tap'
import type { App } from '../../src/app.js'
import { buildTestApp, signIn, type TestApp } from '../helpers/app.js'
import type { RedisServer } from '../helpers/redis.js'
import { SANDBOX_KEY, startSandbox, type RunningSandbox } from '../helpers/sandbox.js'

/**
 * Shared by the fault and abuse suites: the service in front of the Care360 sandbox with a patient
 * signed in, a bounded HTTP client on real sockets, the contract's answer table as an oracle, and
 * a log capture whose lines are scanned for secrets.
 */

type AssertHost = Pick<Test, 'ok' | 'fail'>
interface TeardownHost { teardown: (fn: () => unknown) => void }

/**
 * Rate limits far above any load these suites make (FUZZ_RUNS included): they test faults and
 * answers, and a limiter answering 429 would only hide them.
 */
export const UNLIMITED: Readonly<Record<string, string>> = {
  CV_RATE_LIMIT: '1000000/60s',
  RATE_LIMIT_IP: '1000000/1m',
  RATE_LIMIT_SESSION: '1000000/1m',
  RATE_LIMIT_CANCEL: '1000000/1m'
}

export interface SandboxedAppOptions {
  /** The upstream deadline (CV_TIMEOUT_MS): each suite picks its own, short enough to wait for. */
  upstreamTimeoutMs: number
  /** Who signs in through `POST /auth/session`, a demo patient of the sandbox. */
  email: string
  logStream?: Writable
  redis?: RedisServer
  /** Extra environment (e.g. the web client), over the sandbox's and UNLIMITED. */
  env?: Record<string, string>
  /** buildTestApp's `scanRequests`: false for fuzzed requests. */
  scanRequests?: boolean
}

export interface SandboxedApp extends TestApp {
  sandbox: RunningSandbox
  /** The signed-in patient's session token, and the header that carries it. */
  token: string
  auth: { authorization: string }
}

/** The service against a fresh sandbox (its API key, no rate limits in the way), a patient signed in. */
export async function startSandboxedApp (t: TeardownHost, options: SandboxedAppOptions): Promise<SandboxedApp> {
  const sandbox = await startSandbox(t)
  const built = await buildTestApp(t, {
    upstreamUrl: sandbox.url,
    ...(options.redis === undefined ? {} : { redis: options.redis }),
    ...(options.logStream === undefined ? {} : { logStream: options.logStream }),
    ...(options.scanRequests === undefined ? {} : { scanRequests: options.scanRequests }),
    env: { CV_API_KEY: SANDBOX_KEY, CV_TIMEOUT_MS: String(options.upstreamTimeoutMs), ...UNLIMITED, ...options.env }
  })
  const token = await signIn(built.app, built.issuer, options.email)
  return { ...built, sandbox, token, auth: { authorization: `Bearer ${token}` } }
}

/** The contract's error rows (and README's 503), by status: the only codes each may carry. */
export const ANSWER_TABLE: Readonly<Record<number, readonly string[]>> = {
  400: ['VALIDATION_FAILED', 'UPSTREAM_REJECTED'],
  401: ['SESSION_REQUIRED'],
  403: ['CSRF_REJECTED'],
  404: ['NOT_FOUND', 'APPOINTMENT_NOT_FOUND'],
  408: ['VALIDATION_FAILED'],
  409: ['IDEMPOTENCY_IN_FLIGHT'],
  413: ['PAYLOAD_TOO_LARGE'],
  415: ['UNSUPPORTED_MEDIA_TYPE'],
  422: ['IDEMPOTENCY_MISMATCH'],
  429: ['RATE_LIMITED', 'UPSTREAM_RATE_LIMITED'],
  431: ['VALIDATION_FAILED'],
  501: ['VALIDATION_FAILED'],
  502: ['UPSTREAM_AUTH_FAILED', 'UPSTREAM_ERROR', 'UPSTREAM_UNAVAILABLE'],
  503: ['SERVICE_UNAVAILABLE'],
  504: ['UPSTREAM_TIMEOUT']
}

export const REQUEST_ID = /^[A-Za-z0-9._:-]{1,128}$/

export interface Answer {
  status: number
  headers: IncomingHttpHeaders
  body: string
  /** Milliseconds from the request to the last byte of the answer. */
  ms: number
}

/** The first answer in what a raw connection received, or null before its head is whole. */
export function parseRawAnswer (text: string): Answer | null {
  const head = text.indexOf('\r\n\r\n')
  if (head === -1) return null
  const [statusLine, ...fields] = text.slice(0, head).split('\r\n')
  const headers: Record<string, string> = {}
  for (const field of fields) {
    const at = field.indexOf(':')
    headers[field.slice(0, at).trim().toLowerCase()] = field.slice(at + 1).trim()
  }
  return { status: Number(statusLine?.split(' ')[1]), headers, body: text.slice(head + 4), ms: 0 }
}

/**
 * Why an answer is not a row of the contract's table, or null when it is: an error is the
 * envelope `{ status, success: false, message, code }` with a code of its status's row, carrying
 * `x-request-id` and `cache-control: no-store`; a success is the envelope with `success: true`.
 * Redirects (the web sign-in) and the statuses in `also` are accepted as they are.
 */
export function offContract (answer: { status: number, headers: IncomingHttpHeaders, body: string }, also: readonly number[] = []): string | null {
  const { status, headers } = answer
  if (typeof headers['x-request-id'] !== 'string' || headers['x-request-id'] === '') return `${status} without x-request-id`
  if (also.includes(status)) return null
  if (status === 302 || status === 303) return typeof headers.location === 'string' ? null : `${status} without location`
  if (headers['cache-control'] !== 'no-store') return `${status} without cache-control: no-store`
  let body: Record<string, unknown>
  try {
    body = JSON.parse(answer.body) as Record<string, unknown>
  } catch {
    return `${status} with a body that is not JSON: ${answer.body.slice(0, 80)}`
  }
  if (typeof body !== 'object' || body === null || Array.isArray(body)) return `${status} with a body that is no envelope`
  if (status >= 200 && status < 300) {
    return body.success === true && typeof body.message === 'string' ? null : `${status} not in the success envelope: ${answer.body.slice(0, 120)}`
  }
  const codes = ANSWER_TABLE[status]
  if (codes === undefined) return `status ${status} is not in the answer table: ${answer.body.slice(0, 120)}`
  if (body.status !== status || body.success !== false || typeof body.message !== 'string') return `${status} not in the error envelope: ${answer.body.slice(0, 120)}`
  if (typeof body.code !== 'string' || !codes.includes(body.code)) return `${status} with code ${String(body.code)}, not one of ${codes.join(', ')}`
  // "Every 429 carries Retry-After (seconds)": delay-seconds, never 0 (a client told 0 retries at once).
  if (status === 429 && !/^[1-9][0-9]*$/.test(String(headers['retry-after']))) return `429 ${body.code} without Retry-After in seconds (${String(headers['retry-after'])})`
  // The one error with data: a sign-out whose session had ended still names the IdP's end-session URL.
  const endSession = status === 401 && typeof (body.data as { endSessionUrl?: unknown } | undefined)?.endSessionUrl === 'string' && Object.keys(body.data as object).length === 1
  const extra = Object.keys(body).filter((key) => !['status', 'success', 'message', 'code', 'error'].includes(key) && !(key === 'data' && endSession))
  if (extra.length > 0) return `${status} envelope with extra fields ${extra.join(', ')}`
  return null
}

/** `status CODE` of an answer (the code of an error envelope, `-` otherwise), for oracles and messages. */
export function outcome (answer: { status: number, body: string }): string {
  try {
    const code = (JSON.parse(answer.body) as { code?: unknown }).code
    return `${answer.status} ${typeof code === 'string' ? code : '-'}`
  } catch {
    return `${answer.status} -`
  }
}

export interface CallOptions {
  method?: string
  path: string
  headers?: Record<string, string>
  body?: string | Buffer
  /** No answer within this bound is a hang: the call rejects with `HangError`. */
  timeoutMs?: number
}

export class HangError extends Error {
  constructor (what: string, ms: number) {
    super(`no answer to ${what} within ${ms} ms`)
    this.name = 'HangError'
  }
}

/** One request on its own connection (no keep-alive pool), bounded in time. */
export function call (origin: string, options: CallOptions): Promise<Answer> {
  const timeoutMs = options.timeoutMs ?? 5000
  const method = options.method ?? 'GET'
  const started = performance.now()
  return new Promise((resolve, reject) => {
    const request = httpRequest(new URL(options.path, origin), {
      method,
      agent: false,
      headers: { connection: 'close', ...options.headers }
    }, (response) => {
      const chunks: Buffer[] = []
      response.on('data', (chunk: Buffer) => chunks.push(chunk))
      response.on('end', () => {
        clearTimeout(timer)
        resolve({ status: response.statusCode ?? 0, headers: response.headers, body: Buffer.concat(chunks).toString('utf8'), ms: performance.now() - started })
      })
      response.on('error', (error) => { clearTimeout(timer); reject(error) })
    })
    const timer = setTimeout(() => {
      request.destroy(new HangError(`${method} ${options.path}`, timeoutMs))
    }, timeoutMs)
    request.on('error', (error) => { clearTimeout(timer); reject(error) })
    request.end(options.body)
  })
}

/** Listens the app on a loopback port and gives its origin. */
export async function listen (app: App, port = 0): Promise<string> {
  await app.listen({ host: '127.0.0.1', port })
  return `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`
}

/** Every log line the app writes, kept for the scan. */
export function captureLogs (): { lines: string[], stream: Writable } {
  const lines: string[] = []
  const stream = new Writable({
    write (chunk: Buffer | string, _encoding, done) {
      lines.push(chunk.toString())
      done()
    }
  })
  return { lines, stream }
}

/**
 * No secret or personal value in any log line, in any case, nor in its JSON-escaped spelling.
 * Each value is checked in its own assertion so a failure names it.
 */
export function scanLogs (t: AssertHost, lines: readonly string[], secrets: Readonly<Record<string, string | readonly string[]>>): void {
  t.ok(lines.length > 0, 'log lines were written')
  const all = lines.join('\n').toLowerCase()
  for (const [what, given] of Object.entries(secrets)) {
    const values = (typeof given === 'string' ? [given] : given).filter((value) => value.length >= 6)
    const leaked = values.filter((value) => {
      const spellings = new Set([value.toLowerCase(), JSON.stringify(value).slice(1, -1).toLowerCase()])
      return [...spellings].some((spelling) => all.includes(spelling))
    })
    t.ok(leaked.length === 0, `no ${what} in ${lines.length} log lines (${values.length} checked)${leaked.length === 0 ? '' : `: found ${leaked.length}`}`)
  }
  let parsed = 0
  for (const line of lines) {
    for (const part of line.split('\n')) {
      if (part.trim() === '') continue
      try {
        JSON.parse(part)
        parsed++
      } catch {
        t.fail(`a log line is not JSON: ${part.slice(0, 80)}`)
      }
    }
  }
  t.ok(parsed > 0, 'the log lines are JSON')
}

/** Checks every answer against the table, once per distinct failure so the output stays short. */
export function checkAnswers (t: AssertHost, answers: ReadonlyArray<{ label: string, answer: Answer }>, also: readonly number[] = []): void {
  const failures = new Map<string, number>()
  for (const { label, answer } of answers) {
    const why = offContract(answer, also)
    if (why !== null) failures.set(`${label}: ${why}`, (failures.get(`${label}: ${why}`) ?? 0) + 1)
  }
  for (const [why, count] of failures) t.fail(`${why} (${count}x)`)
  t.ok(failures.size === 0, `${answers.length} answers are rows of the contract's table`)
}
