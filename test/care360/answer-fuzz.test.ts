import { createServer, type AddressInfo, type Socket } from 'node:net'
import { once } from 'node:events'
import { brotliCompressSync, gzipSync } from 'node:zlib'
import { performance } from 'node:perf_hooks'
import t, { type Test } from 'tap'
import fc from 'fast-check'
import type { IncomingHttpHeaders } from 'node:http'
import type { InjectOptions, LightMyRequestResponse } from 'fastify'
import { buildTestApp, signIn, TEST_API_KEY } from '../helpers/app.js'
import { captureLogs, offContract, UNLIMITED } from '../fault/support.js'

/**
 * Property-based fuzz of the upstream's answers. A raw TCP upstream (so that framing itself can be
 * generated: 1xx before the answer, content-length too long or too short, chunked with trailers,
 * a body read until close, a stalled head or body) answers Fetch Appointments (GET /appointments,
 * and a cancel's ownership check) and Cancel with generated statuses, headers and bodies. For every
 * case, through the whole service:
 * - the answer is the row of the contract's Answers table that this upstream answer maps to, in
 *   the envelope, never a 500, within CV_TIMEOUT_MS plus slack;
 * - passthrough texts (`message`, `error`) are capped, free of controls, and never carry the key,
 *   the patient's email or the reason; no upstream header (Set-Cookie, Location, Retry-After of a
 *   5xx, a custom one) reaches the client;
 * - a list is trimmed to its documented fields, odd items skipped, never fatal;
 * - a 429's Retry-After is the upstream's clamped (1 s to 10 min), or the backoff's without a usable
 *   one, and the cooldown then refuses without an upstream call;
 * - prototype keys pollute nothing, and a normal request after each case succeeds.
 */

const RUNS = Number(process.env.FUZZ_RUNS) > 0 ? Number(process.env.FUZZ_RUNS) : 100
const TIMEOUT_MS = 300
/** No answer may take longer than the upstream deadline plus this much. */
const BOUND_MS = TIMEOUT_MS + 1500
/** Time each property may spend (ms), whatever RUNS says: the whole file stays well under 20 s. */
const BUDGET_MS = 2500
/**
 * Cases each property runs whatever the budget says: a machine slow enough to spend the budget
 * before the first case would otherwise pass a property that checked nothing.
 */
const MIN_RUNS = Math.min(RUNS, 10)
const EMAIL = 'fuzz.patient+care@example.com'
const REASON = 'private fuzz reason about my knee'
const LIST_CAP = 1024 * 1024
const CANCEL_CAP = 64 * 1024
const MAX_TEXT = 300
const UNSAFE = /[\u0000-\u001f\u007f-\u009f\u202a-\u202e\u2066-\u2069]/u // eslint-disable-line no-control-regex
/** Words only the upstream says: never in a log line (error lines carry our own messages only). */
const UPSTREAM_WORDS = 'upstream-words-7f3a9c'
const FUTURE = '2099-01-20T15:00:00Z'
const PAST = '2001-01-20T15:00:00Z'

// ---------------------------------------------------------------------------------------------
// The upstream's answers, generated

type Framing = 'length' | 'chunked' | 'trailers' | 'close' | 'declared-more' | 'declared-less'
type Encoding = 'none' | 'gzip' | 'br' | 'x-unknown'

interface Reply {
  informational: number[]
  status: number
  headers: Array<[string, string]>
  /** The body as the upstream means it, before any content coding. */
  body: Buffer
  framing: Framing
  encoding: Encoding
  stall: 'none' | 'head' | 'body'
  /** One header line over undici's 16 KiB limit. */
  hugeHeader: boolean
  /** The connection stays open after a well-framed answer (the pool may send the next call on it). */
  keepAlive: boolean
}

const STATUSES = [200, 200, 200, 200, 400, 400, 400, 401, 404, 404, 409, 410, 422, 429, 429, 429,
  500, 502, 503, 504, 201, 202, 204, 206, 301, 302, 303, 304, 307, 308, 418, 499, 451, 599, 600, 999]

const status = fc.oneof({ weight: 5, arbitrary: fc.constantFrom(...STATUSES) }, { weight: 1, arbitrary: fc.integer({ min: 200, max: 599 }) })

/** Texts the upstream may send back as `message` or `error`. */
const text = fc.oneof(
  fc.constantFrom('Invalid request', 'Appointment not found', 'NotFoundError', 'Meeting cancelled successfully', '', '   ', UPSTREAM_WORDS, `Error: ${UPSTREAM_WORDS}`),
  fc.string({ maxLength: 40 }),
  fc.string({ unit: 'binary', maxLength: 40 }),
  fc.string({ minLength: 290, maxLength: 2000 }),
  fc.string({ unit: fc.constantFrom('a', ' ', '\u0000', '\n', '\t', '\u007f', '\u0085', '\u202e', '\u2066', 'é', '😀', '\r'), maxLength: 400 }),
  fc.constantFrom(
    `No appointment for ${EMAIL}`,
    `no appointment for ${EMAIL.toUpperCase()} found`,
    `user_email=${encodeURIComponent(EMAIL)} unknown`,
    `key ${TEST_API_KEY} refused`,
    `Reason "${REASON}" is too long`,
    `reason=${encodeURIComponent(REASON)}`,
    `{"email":${JSON.stringify(EMAIL)},"reason":${JSON.stringify(REASON)}}`,
    'x'.repeat(301),
    '😀'.repeat(301)
  ),
  fc.oneof(fc.integer(), fc.constant(null), fc.boolean(), fc.array(fc.string(), { maxLength: 2 }), fc.constant({ nested: 'obj' }))
)

const uuid = fc.uuid()
const dateLike = fc.oneof(fc.constantFrom(FUTURE, PAST, 'not a date', '', '2099-13-45'), fc.integer(), fc.constant(null))

/** An item of a list answer: the documented fields, others, missing ones, wrong types. */
function itemArbitrary (target?: string): fc.Arbitrary<unknown> {
  const id = target === undefined
    ? fc.oneof({ weight: 6, arbitrary: uuid }, { weight: 1, arbitrary: fc.constantFrom('', 7, null) })
    : fc.oneof(uuid, fc.constant(target), fc.constant(target.toUpperCase()))
  return fc.oneof(
    {
      weight: 8,
      arbitrary: fc.record({
        id,
        agentEventId: fc.oneof(uuid, fc.constant(null), fc.integer(), ...(target === undefined ? [] : [fc.constant(target)])),
        title: fc.oneof(fc.string({ maxLength: 20 }), fc.constant(null), fc.integer()),
        topic: fc.oneof(fc.string({ maxLength: 20 }), fc.constant(null)),
        start: dateLike,
        end: dateLike,
        startDateTime: dateLike,
        endDateTime: dateLike,
        status: fc.constantFrom('CONFIRMED', 'SCHEDULED', 'cancelled', 'CANCELED', 'Cancelled', 'weird', 5, null),
        isDeleted: fc.constantFrom(true, false, 'true', null),
        agentName: fc.oneof(fc.string({ maxLength: 20 }), fc.constant(null)),
        description: fc.constantFrom('Knee pain follow-up', `call ${EMAIL}`),
        color: fc.constant('#FF5733'),
        meetingDetails: fc.constant({ url: 'https://meet.example/abc' }),
        case: fc.constant({ id: 'case-id' }),
        patientEmail: fc.constant(EMAIL)
      }, { requiredKeys: ['id'] })
    },
    { weight: 1, arbitrary: fc.constantFrom(null, 5, 'item', [], [1, 2], true) }
  )
}

/** A JSON text as the upstream writes it, with raw tricks JSON.stringify cannot make. */
function jsonText (value: Record<string, unknown>, tricks: { proto: boolean, duplicate: unknown, bom: boolean }): string {
  let body = JSON.stringify(value)
  if (tricks.proto) body = `{"__proto__":{"polluted":"yes","success":true},"constructor":{"prototype":{"polluted":"yes"}},${body.slice(1)}`
  if (tricks.duplicate !== undefined) body = `${body.slice(0, -1)}${body.length > 2 ? ',' : ''}"success":${JSON.stringify(tricks.duplicate)}}`
  return tricks.bom ? `\uFEFF${body}` : body
}

function envelopeArbitrary (listItems: fc.Arbitrary<unknown[]>): fc.Arbitrary<Buffer> {
  const envelope = fc.record({
    status: fc.oneof(fc.integer(), fc.constant(1e308), fc.constant('200')),
    success: fc.constantFrom(true, true, false, false, 'true', 1, null),
    message: text,
    error: text,
    code: fc.constantFrom('NotFoundError', 'VALIDATION', 'ApiKeyNotFoundError', 7),
    name: fc.constantFrom('NotFoundError', 'CaseNotFoundError'),
    data: fc.oneof({ weight: 5, arbitrary: listItems }, { weight: 1, arbitrary: fc.constantFrom(null, 'not a list', { items: [] }, 5) })
  }, { requiredKeys: [] })
  const tricks = fc.record({
    proto: fc.boolean(),
    duplicate: fc.oneof({ weight: 4, arbitrary: fc.constant(undefined) }, { weight: 1, arbitrary: fc.constantFrom(true, false, 'yes') }),
    bom: fc.boolean()
  })
  return fc.tuple(envelope, tricks).map(([value, how]) => Buffer.from(jsonText(value, how)))
}

/** Bodies that are no envelope at all. */
const odd = fc.oneof(
  fc.constantFrom('', 'null', '[]', '[{"status":200,"success":true}]', '"text"', '42', 'true', '<html><body>502 Bad Gateway</body></html>',
    '{"status":200,"success":true', '\uFEFF\uFEFF{"success":true}', '{"success":true,"data":[1e400]}', '{"a":1}{"b":2}'
  ).map((body) => Buffer.from(body)),
  fc.constant(Buffer.from([0xff, 0xfe, 0x7b, 0x22, 0xc3, 0x28, 0x22, 0x3a, 0x31, 0x7d])),
  fc.constant(Buffer.concat([Buffer.from('{"status":400,"success":false,"message":"bad \xff\xfe bytes ', 'latin1'), Buffer.from([0xc3, 0x28, 0xed, 0xa0, 0x80]), Buffer.from('"}')])),
  fc.integer({ min: 1000, max: 20_000 }).map((depth) => Buffer.from(`${'['.repeat(depth)}${']'.repeat(depth)}`)),
  fc.integer({ min: 100, max: 3000 }).map((depth) => Buffer.from(`{"success":true,"data":[],"deep":${'{"a":'.repeat(depth)}1${'}'.repeat(depth)}}`)),
  fc.constant(Buffer.from(`{"status":200,"success":true,"message":"${'9'.repeat(400)}","data":[],"n":${'9'.repeat(400)}}`))
)

const retryAfter = fc.oneof(
  fc.integer({ min: 0, max: 2000 }).map(String),
  fc.constantFrom('99999999999999999999999', '-5', '1.5', '+5', 'soon', 'Retry 2', 'later, 2099', 'x 3000', 'tomorrow', '', '0x10', '1e3'),
  fc.integer({ min: -120, max: 1200 }).map((seconds) => new Date(Date.now() + seconds * 1000).toUTCString())
)

const header = fc.oneof(
  fc.constantFrom<Array<[string, string]>>(
    [['content-type', 'application/json']],
    [['content-type', 'application/json; charset=utf-8']],
    [['content-type', 'application/json; charset=iso-8859-1']],
    [['content-type', 'application/problem+json']],
    [['content-type', 'text/html']],
    [['content-type', 'text/plain; charset=utf-8']],
    [],
    [['set-cookie', 'upstream_session=abc123; Path=/; HttpOnly'], ['set-cookie', 'tracking=1']],
    [['location', 'https://evil.example/redirected']],
    [['x-upstream-trace', 'trace-123'], ['x-powered-by', 'Care360']],
    [['www-authenticate', 'Basic realm="care360"']],
    [['cache-control', 'public, max-age=3600']],
    [['access-control-allow-origin', '*']],
    [['date', 'not a date']],
    [['date', new Date(Date.now() - 3_600_000).toUTCString()]]
  ),
  fc.integer({ min: 50, max: 300 }).map((count) => Array.from({ length: count }, (_, i): [string, string] => [`x-many-${i}`, `v${i}`]))
)

const replyArbitrary = (body: fc.Arbitrary<Buffer>): fc.Arbitrary<Reply> => fc.record({
  informational: fc.oneof({ weight: 5, arbitrary: fc.constant<number[]>([]) }, { weight: 1, arbitrary: fc.array(fc.constantFrom(102, 103), { minLength: 1, maxLength: 3 }) }),
  status,
  headers: fc.tuple(header, header, fc.option(fc.array(retryAfter, { minLength: 1, maxLength: 2 }), { nil: undefined }))
    .map(([a, b, retry]) => [...a, ...b, ...(retry ?? []).map((value): [string, string] => ['retry-after', value])]),
  body,
  framing: fc.oneof({ weight: 8, arbitrary: fc.constant<Framing>('length') }, { weight: 1, arbitrary: fc.constantFrom<Framing>('chunked', 'trailers', 'close', 'declared-more', 'declared-less') }),
  encoding: fc.oneof({ weight: 10, arbitrary: fc.constant<Encoding>('none') }, { weight: 1, arbitrary: fc.constantFrom<Encoding>('gzip', 'br', 'x-unknown') }),
  stall: fc.oneof({ weight: 30, arbitrary: fc.constant<Reply['stall']>('none') }, { weight: 1, arbitrary: fc.constantFrom<Reply['stall']>('head', 'body') }),
  hugeHeader: fc.oneof({ weight: 40, arbitrary: fc.constant(false) }, { weight: 1, arbitrary: fc.constant(true) }),
  keepAlive: fc.boolean()
})

function listBody (target?: string): fc.Arbitrary<Buffer> {
  const items = fc.array(itemArbitrary(target), { maxLength: 6 })
  return fc.oneof(
    { weight: 6, arbitrary: envelopeArbitrary(items) },
    { weight: 2, arbitrary: odd },
    // The documented answer, and one over the cap.
    { weight: 2, arbitrary: items.map((data) => Buffer.from(JSON.stringify({ status: 200, success: true, message: 'Appointments fetched successfully', data }))) },
    { weight: 1, arbitrary: fc.constant(Buffer.from(JSON.stringify({ status: 200, success: true, message: 'big', data: [], pad: 'x'.repeat(LIST_CAP) }))) }
  )
}

const cancelBody = fc.oneof(
  { weight: 6, arbitrary: envelopeArbitrary(fc.constant([])) },
  { weight: 2, arbitrary: odd },
  { weight: 1, arbitrary: fc.constant(Buffer.from(JSON.stringify({ status: 200, success: true, message: 'x'.repeat(CANCEL_CAP) }))) }
)

// ---------------------------------------------------------------------------------------------
// A raw upstream

interface Received { method: string, path: string, headers: Record<string, string> }
type Handler = (request: Received, socket: Socket) => void

function wire (reply: Reply): Buffer {
  if (reply.encoding === 'gzip') return gzipSync(reply.body)
  if (reply.encoding === 'br') return brotliCompressSync(reply.body)
  return reply.body
}

function declaredLength (reply: Reply, bytes: Buffer): number | null {
  if (reply.framing === 'length') return bytes.length
  if (reply.framing === 'declared-more') return bytes.length + 10
  if (reply.framing === 'declared-less') return Math.max(0, bytes.length - 3)
  return null
}

function writeReply (socket: Socket, reply: Reply): void {
  // A stalled answer holds its connection a few seconds at most, whatever the client does.
  if (reply.stall !== 'none') setTimeout(() => socket.destroy(), 4000).unref()
  if (reply.stall === 'head') return
  // Kept open only when the answer's end is known from its framing (never read until close) and
  // nothing is left behind it: otherwise the next call on it would meet this one's leftovers.
  const keepAlive = reply.keepAlive && reply.stall === 'none' && !reply.hugeHeader && ['length', 'chunked', 'trailers'].includes(reply.framing) &&
    reply.status !== 204 && reply.status !== 304
  for (const code of reply.informational) socket.write(`HTTP/1.1 ${code} Informational\r\n${code === 103 ? 'Link: </style.css>; rel=preload\r\n' : ''}\r\n`)
  const bytes = wire(reply)
  const lines = [`HTTP/1.1 ${reply.status} Whatever`, ...reply.headers.map(([name, value]) => `${name}: ${value}`), ...(keepAlive ? [] : ['Connection: close'])]
  if (reply.encoding !== 'none') lines.push(`Content-Encoding: ${reply.encoding}`)
  if (reply.hugeHeader) lines.push(`X-Huge: ${'h'.repeat(20 * 1024)}`)
  const declared = declaredLength(reply, bytes)
  if (declared !== null) lines.push(`Content-Length: ${declared}`)
  if (reply.framing === 'chunked' || reply.framing === 'trailers') lines.push('Transfer-Encoding: chunked')
  if (reply.framing === 'trailers') lines.push('Trailer: X-Checksum, Set-Cookie')
  socket.write(`${lines.join('\r\n')}\r\n\r\n`)
  if (reply.stall === 'body') {
    const chunked = reply.framing === 'chunked' || reply.framing === 'trailers'
    socket.write(chunked ? Buffer.concat([Buffer.from('1\r\n'), bytes.length > 0 ? bytes.subarray(0, 1) : Buffer.from('{'), Buffer.from('\r\n')]) : bytes.subarray(0, Math.floor(bytes.length / 2)))
    return
  }
  if (reply.framing === 'chunked' || reply.framing === 'trailers') {
    const half = Math.floor(bytes.length / 2)
    for (const part of [bytes.subarray(0, half), bytes.subarray(half)]) {
      if (part.length > 0) socket.write(Buffer.concat([Buffer.from(`${part.length.toString(16)}\r\n`), part, Buffer.from('\r\n')]))
    }
    socket.write(reply.framing === 'trailers' ? '0\r\nX-Checksum: abc\r\nSet-Cookie: trailer=1\r\n\r\n' : '0\r\n\r\n')
  } else {
    socket.write(bytes)
  }
  if (!keepAlive) socket.end()
}

const NORMAL_LIST: Handler = (_request, socket) => {
  const body = JSON.stringify({ status: 200, success: true, message: 'Appointments fetched successfully', data: [] })
  socket.end(`HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`)
}

const NORMAL_CANCEL: Handler = (_request, socket) => {
  const body = JSON.stringify({ status: 200, success: true, message: 'Meeting cancelled successfully' })
  socket.end(`HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`)
}

async function rawUpstream (t: Test): Promise<{ url: string, received: Received[], handlers: { list: Handler, cancel: Handler } }> {
  const received: Received[] = []
  const handlers = { list: NORMAL_LIST, cancel: NORMAL_CANCEL }
  const sockets = new Set<Socket>()
  const server = createServer((socket) => {
    sockets.add(socket)
    socket.on('close', () => sockets.delete(socket))
    socket.on('error', () => {})
    let buffer = Buffer.alloc(0)
    socket.on('data', (chunk: Buffer) => {
      buffer = Buffer.concat([buffer, chunk])
      for (;;) {
        const end = buffer.indexOf('\r\n\r\n')
        if (end === -1) return
        const [first, ...fields] = buffer.subarray(0, end).toString('latin1').split('\r\n')
        const headers: Record<string, string> = {}
        for (const field of fields) {
          const at = field.indexOf(':')
          headers[field.slice(0, at).trim().toLowerCase()] = field.slice(at + 1).trim()
        }
        const length = Number(headers['content-length'] ?? 0)
        if (buffer.length < end + 4 + length) return
        buffer = buffer.subarray(end + 4 + length)
        const [method = '', path = ''] = (first ?? '').split(' ')
        const request = { method, path, headers }
        received.push(request)
        ;(method === 'POST' ? handlers.cancel : handlers.list)(request, socket)
      }
    })
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  t.teardown(() => {
    for (const socket of sockets) socket.destroy()
    server.close()
  })
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, received, handlers }
}

// ---------------------------------------------------------------------------------------------
// The oracle: the contract's Answers table (and the README's reading of a NotFoundError)

type Envelope = Record<string, unknown>
// Written out, not imported from the client: the oracle says which fields a patient app may get,
// so a field the client starts passing on fails here instead of widening the expectation with it.
interface PatientAppointment {
  id: string
  agentEventId: string | null
  title: string | null
  topic: string | null
  start: string | null
  end: string | null
  status: string | null
  agentName: string | null
}

type Expected =
  | { kind: 'error', status: number, code: string, upstreamText?: { message: unknown, error: unknown } }
  | { kind: 'rate-limited', retryAfter: string[] | undefined, date: string | undefined }
  | { kind: 'list', items: PatientAppointment[] }
  | { kind: 'cancelled', message: unknown }

function envelopeOf (bytes: Buffer): Envelope | null {
  try {
    let decoded = bytes.toString('utf8')
    if (decoded.charCodeAt(0) === 0xfeff) decoded = decoded.slice(1)
    const value: unknown = JSON.parse(decoded)
    return typeof value === 'object' && value !== null && !Array.isArray(value) ? value as Envelope : null
  } catch {
    return null
  }
}

function namesNotFound (envelope: Envelope | null): boolean {
  return envelope !== null && envelope.success === false &&
    [envelope.error, envelope.code, envelope.name, envelope.message].includes('NotFoundError')
}

const err = (status: number, code: string): Expected => ({ kind: 'error', status, code })

function str (value: unknown): string | null {
  return typeof value === 'string' ? value : null
}

function trimmed (items: unknown[]): PatientAppointment[] {
  const out: PatientAppointment[] = []
  for (const item of items) {
    if (typeof item !== 'object' || item === null) continue
    const raw = item as Record<string, unknown>
    if (typeof raw.id !== 'string' || raw.id === '') continue
    if (raw.isDeleted === true || (typeof raw.status === 'string' && /^cancell?ed$/i.test(raw.status))) continue
    const end = str(raw.end) ?? str(raw.endDateTime)
    if (end !== null && !Number.isNaN(Date.parse(end)) && Date.parse(end) <= Date.now()) continue
    out.push({
      id: raw.id,
      agentEventId: str(raw.agentEventId),
      title: str(raw.title),
      topic: str(raw.topic),
      start: str(raw.start) ?? str(raw.startDateTime),
      end,
      status: str(raw.status),
      agentName: str(raw.agentName)
    })
  }
  return out
}

/** What the service must answer for this upstream answer to one call. */
function expectedOf (endpoint: 'list' | 'cancel', reply: Reply): Expected {
  if (reply.stall === 'head') return err(504, 'UPSTREAM_TIMEOUT')
  if (reply.hugeHeader) return err(502, 'UPSTREAM_ERROR')
  if (reply.status === 429) {
    const retry = reply.headers.filter(([name]) => name === 'retry-after').map(([, value]) => value)
    return { kind: 'rate-limited', retryAfter: retry.length === 0 ? undefined : retry, date: reply.headers.find(([name]) => name === 'date')?.[1] }
  }
  const bodiless = reply.status === 204 || reply.status === 304
  const bytes = wire(reply)
  let seen = bytes
  if (!bodiless) {
    const cap = endpoint === 'list' ? LIST_CAP : CANCEL_CAP
    const declared = declaredLength(reply, bytes)
    // A declared length over the cap is refused at the head, before any body.
    if ((declared ?? 0) > cap) return err(502, 'UPSTREAM_ERROR')
    // A stalled body is a stall unless the half written already holds all it declared.
    if (reply.stall === 'body' && (declared === null || Math.floor(bytes.length / 2) < declared)) return err(504, 'UPSTREAM_TIMEOUT')
    if (bytes.length > cap) return err(502, 'UPSTREAM_ERROR')
    if (reply.framing === 'declared-more') return err(502, 'UPSTREAM_ERROR')
    if (reply.framing === 'declared-less' || reply.stall === 'body') seen = bytes.subarray(0, declared as number)
  } else {
    seen = Buffer.alloc(0)
  }
  const envelope = envelopeOf(seen)
  const { status } = reply
  if (status === 401) return err(502, 'UPSTREAM_AUTH_FAILED')
  if (status === 400 && envelope !== null && !namesNotFound(envelope)) {
    return { kind: 'error', status: 400, code: 'UPSTREAM_REJECTED', upstreamText: { message: envelope.message, error: envelope.error } }
  }
  const notFound = namesNotFound(envelope) && [400, 404, 409, 410, 422].includes(status)
  if (endpoint === 'list') {
    if (notFound) return { kind: 'list', items: [] }
    if (status === 404 && envelope !== null && envelope.success === false) return { kind: 'list', items: [] }
    if (status !== 200 || envelope === null || envelope.success !== true || !Array.isArray(envelope.data)) return err(502, 'UPSTREAM_ERROR')
    return { kind: 'list', items: trimmed(envelope.data) }
  }
  if (notFound) return err(404, 'APPOINTMENT_NOT_FOUND')
  if (status !== 200 || envelope === null || envelope.success !== true) return err(502, 'UPSTREAM_ERROR')
  return { kind: 'cancelled', message: envelope.message }
}

/** An HTTP-date in one of RFC 9110's three forms (5.6.7), or null. */
function httpDate (value: string): number | null {
  const imf = /^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d{2}:\d{2}:\d{2} GMT$/
  return imf.test(value) ? Date.parse(value) : null
}

/** The Retry-After seconds our 429 must carry: the upstream's, clamped; the first backoff without one. */
function retryAfterRange (retry: string[] | undefined, date: string | undefined): [number, number] {
  const value = retry?.[0]?.trim()
  const backoff: [number, number] = [1, 2]
  if (value === undefined || value === '') return backoff
  let ms: number
  if (/^[0-9]+$/.test(value)) {
    ms = Number(value) * 1000
  } else {
    const at = httpDate(value)
    if (at === null) return backoff
    const answeredAt = date === undefined ? Number.NaN : Date.parse(date)
    ms = at - (Number.isNaN(answeredAt) ? Date.now() : answeredAt)
  }
  const clamped = Math.min(600_000, Math.max(1000, ms))
  const seconds = Math.ceil(clamped / 1000)
  // A date is counted from the moment it is read: a second either way.
  return /^[0-9]+$/.test(value) ? [seconds, seconds] : [Math.max(1, seconds - 2), Math.min(600, seconds + 1)]
}

function plain (value: unknown, secrets: readonly string[]): value is string {
  if (typeof value !== 'string') return false
  const text = value.trim()
  return text !== '' && text === value && !UNSAFE.test(text) && Array.from(text).length <= MAX_TEXT &&
    !secrets.some((secret) => text.toLowerCase().includes(secret.toLowerCase())) &&
    !/reason|email|key|%|\+|\\/i.test(text)
}

/** A passed-through text: capped, without controls or secrets; exactly the upstream's when it was plain. */
function checkText (t: Test, what: string, given: unknown, got: unknown, fallback: string | undefined, secrets: readonly string[]): void {
  if (got === undefined) {
    t.ok(fallback === undefined && !plain(given, secrets), `${what}: absent only when the upstream gave nothing usable`)
    return
  }
  if (typeof got !== 'string') {
    t.fail(`${what} is not a string`)
    return
  }
  t.ok(Array.from(got).length <= MAX_TEXT, `${what} is capped (${Array.from(got).length})`)
  t.notOk(UNSAFE.test(got), `${what} carries no control or bidi character`)
  for (const secret of secrets) {
    t.notOk(got.toLowerCase().includes(secret.toLowerCase()), `${what} does not echo a secret`, { got, given })
  }
  if (plain(given, secrets)) t.equal(got, given, `${what} is the upstream's`)
  else if (fallback !== undefined && (typeof given !== 'string' || given.replace(/[\s\u0000-\u001f\u007f-\u009f\u202a-\u202e\u2066-\u2069]/g, '') === '')) t.equal(got, fallback, `${what}: our default`) // eslint-disable-line no-control-regex
}

/** A short name of a generated answer, for assertion messages. */
function describe (reply: Reply): string {
  const extras = [reply.framing, reply.encoding, reply.stall, reply.hugeHeader ? 'huge header' : '', reply.informational.join('+')].filter((part) => part !== '' && part !== 'none' && part !== 'length')
  return `${reply.status}${extras.length > 0 ? ` (${extras.join(', ')})` : ''}`
}

/** Upstream headers that must never reach the client. */
const NEVER_FORWARDED = ['set-cookie', 'location', 'content-encoding', 'x-upstream-trace', 'x-powered-by', 'www-authenticate', 'x-huge', 'x-checksum', 'trailer', 'x-many-0', 'access-control-allow-origin']

/** What an upstream answer must never echo back: the key and the email; the reason too for the cancel, which sent it. */
const LIST_SECRETS = [EMAIL, TEST_API_KEY, encodeURIComponent(EMAIL)]
const CANCEL_SECRETS = [...LIST_SECRETS, REASON, encodeURIComponent(REASON)]

function checkAnswer (t: Test, label: string, answer: LightMyRequestResponse, ms: number, expected: Expected, secrets: readonly string[]): boolean {
  const before = t.counts.fail
  t.match(answer.headers['content-type'], /^application\/json/, `${label}: JSON`)
  const seen = { status: answer.statusCode, headers: answer.headers as IncomingHttpHeaders, body: answer.body }
  t.ok(ms < BOUND_MS, `${label}: answered in ${Math.round(ms)} ms`)
  t.equal(offContract(seen), null, `${label}: a row of the contract's table`, { body: answer.body.slice(0, 200) })
  t.not(answer.statusCode, 500, `${label}: never a 500`)
  for (const name of NEVER_FORWARDED) t.notOk(name in answer.headers, `${label}: no ${name} from the upstream`)
  if (expected.kind !== 'rate-limited') t.notOk('retry-after' in answer.headers, `${label}: no Retry-After from the upstream`)
  t.equal(Object.getPrototypeOf({}), Object.prototype)
  t.equal(({} as Record<string, unknown>).polluted, undefined, `${label}: no prototype pollution`)
  let body: Record<string, unknown>
  try {
    body = JSON.parse(answer.body) as Record<string, unknown>
  } catch {
    t.fail(`${label}: a JSON body`)
    return false
  }
  switch (expected.kind) {
    case 'error':
      t.same([answer.statusCode, body.code], [expected.status, expected.code], `${label}: ${expected.status} ${expected.code} (${String(body.message)})`)
      if (expected.upstreamText !== undefined) {
        checkText(t, `${label} message`, expected.upstreamText.message, body.message, 'The appointment service rejected the request', secrets)
        checkText(t, `${label} error`, expected.upstreamText.error, body.error, undefined, secrets)
      }
      break
    case 'rate-limited': {
      t.same([answer.statusCode, body.code], [429, 'UPSTREAM_RATE_LIMITED'], `${label}: 429 UPSTREAM_RATE_LIMITED`)
      t.ok('ratelimit' in answer.headers && 'ratelimit-policy' in answer.headers, `${label}: a rate-limited route's RateLimit fields`, { headers: answer.headers })
      const [low, high] = retryAfterRange(expected.retryAfter, expected.date)
      const seconds = Number(answer.headers['retry-after'])
      t.ok(/^[0-9]+$/.test(String(answer.headers['retry-after'])) && seconds >= low && seconds <= high,
        `${label}: Retry-After ${String(answer.headers['retry-after'])} within [${low}, ${high}] for ${JSON.stringify(expected.retryAfter)}`)
      break
    }
    case 'list':
      t.equal(answer.statusCode, 200, `${label}: 200`)
      t.same(Object.keys(body).sort(), ['data', 'message', 'status', 'success'], `${label}: the list envelope`)
      t.strictSame(body.data, expected.items, `${label}: the documented fields only, odd items skipped`)
      break
    case 'cancelled':
      t.equal(answer.statusCode, 200, `${label}: 200`)
      t.same(Object.keys(body).sort(), ['message', 'status', 'success'], `${label}: the cancel envelope`)
      t.same([body.status, body.success], [200, true])
      checkText(t, `${label} message`, expected.message, body.message, 'Appointment cancelled', secrets)
      break
  }
  return t.counts.fail === before
}

// ---------------------------------------------------------------------------------------------

t.test('generated upstream answers map to the contract\'s rows', async (t) => {
  const upstream = await rawUpstream(t)
  // The stores' clock: moved past a cooldown after each 429 case, so the next case calls again.
  let offset = 0
  const now = (): number => Date.now() + offset
  const { lines, stream } = captureLogs()
  const { app, issuer } = await buildTestApp(t, {
    upstreamUrl: upstream.url,
    now,
    logStream: stream,
    env: { CV_TIMEOUT_MS: String(TIMEOUT_MS), ...UNLIMITED, SESSION_IDLE_TTL: '365d', SESSION_ABSOLUTE_TTL: '365d' }
  })
  const token = await signIn(app, issuer, EMAIL)
  const auth = { authorization: `Bearer ${token}` }
  const prototypeKeys = Object.getOwnPropertyNames(Object.prototype).sort()

  async function timed (options: InjectOptions): Promise<{ answer: LightMyRequestResponse, ms: number }> {
    const started = performance.now()
    let timer: NodeJS.Timeout | undefined
    const hang = new Promise<never>((_resolve, reject) => { timer = setTimeout(() => reject(new Error('no answer: a hang')), BOUND_MS + 3000) })
    try {
      const answer = await Promise.race([app.inject(options), hang])
      return { answer, ms: performance.now() - started }
    } finally {
      clearTimeout(timer)
    }
  }

  const list = () => timed({ method: 'GET', url: '/appointments', headers: auth })
  const cancel = (id: string, key?: string) => timed({
    method: 'POST',
    url: `/appointments/${id}/cancel`,
    headers: { ...auth, 'content-type': 'application/json', ...(key === undefined ? {} : { 'idempotency-key': key }) },
    payload: { reason: REASON }
  })

  /** After a 429: the cooldown refuses without an upstream call, then the clock moves past it. */
  async function afterRateLimited (t: Test, label: string, first: LightMyRequestResponse): Promise<boolean> {
    const calls = upstream.received.length
    const { answer } = await list()
    const ok = answer.statusCode === 429 && upstream.received.length === calls &&
      Number(answer.headers['retry-after']) <= Number(first.headers['retry-after']) && Number(answer.headers['retry-after']) >= 1
    if (!ok) t.fail(`${label}: the cooldown refuses without an upstream call (${answer.statusCode}, ${upstream.received.length - calls} calls, Retry-After ${String(answer.headers['retry-after'])} after ${String(first.headers['retry-after'])})`)
    offset += 11 * 60_000
    return ok
  }

  /** A normal list after each case: the process stays healthy. */
  async function stillServes (t: Test, label: string): Promise<boolean> {
    upstream.handlers.list = NORMAL_LIST
    upstream.handlers.cancel = NORMAL_CANCEL
    const { answer } = await list()
    if (answer.statusCode !== 200) t.fail(`${label}: a normal list afterwards is ${answer.statusCode} ${answer.body.slice(0, 120)}`)
    const same = JSON.stringify(Object.getOwnPropertyNames(Object.prototype).sort()) === JSON.stringify(prototypeKeys)
    if (!same) t.fail(`${label}: Object.prototype changed`)
    return answer.statusCode === 200 && same
  }

  /** The upstream's requests carry only the documented headers. */
  function onlyDocumentedHeaders (t: Test, from: number, answer: LightMyRequestResponse): boolean {
    const allowed = new Set(['cv-api-key', 'x-request-id', 'content-type', 'content-length', 'host', 'connection'])
    const sent = upstream.received.slice(from)
    const extra = sent.flatMap((request) => Object.keys(request.headers).filter((name) => !allowed.has(name)))
    if (extra.length > 0) t.fail(`headers sent upstream beyond the documented ones: ${[...new Set(extra)].join(', ')}`)
    const ids = sent.filter((request) => request.headers['x-request-id'] !== answer.headers['x-request-id'])
    if (ids.length > 0) t.fail('the upstream got another x-request-id than the answer carries')
    return extra.length === 0 && ids.length === 0
  }

  async function settle (t: Test, label: string, answer: LightMyRequestResponse, expected: Expected, from: number): Promise<boolean> {
    let ok = onlyDocumentedHeaders(t, from, answer)
    if (expected.kind === 'rate-limited' || answer.statusCode === 429) ok = await afterRateLimited(t, label, answer) && ok
    return await stillServes(t, label) && ok
  }

  const params = { numRuns: RUNS, endOnFailure: true, ...(process.env.FUZZ_SEED === undefined ? {} : { seed: Number(process.env.FUZZ_SEED) }) }
  /**
   * Each property stops sending after BUDGET_MS (a loaded machine), once it has run MIN_RUNS cases:
   * later runs pass at once. fast-check's own interruptAfterTimeLimit leaves the run in flight
   * dangling, asserting on an ended test, and it may end a property before its first case.
   */
  function budget (t: Test): () => boolean {
    const ends = performance.now() + BUDGET_MS
    let ran = 0
    t.teardown(() => { t.comment(`${ran} generated answers (${BUDGET_MS} ms, at least ${MIN_RUNS})`) })
    return () => {
      if (ran >= MIN_RUNS && performance.now() > ends) return true
      ran++
      return false
    }
  }

  await t.test('Fetch Appointments (GET /appointments)', async (t) => {
    const spent = budget(t)
    await fc.assert(fc.asyncProperty(replyArbitrary(listBody()), async (reply) => {
      if (spent()) return true
      const from = upstream.received.length
      upstream.handlers.list = (_request, socket) => writeReply(socket, reply)
      const { answer, ms } = await list()
      const expected = expectedOf('list', reply)
      const ok = checkAnswer(t, `list ${describe(reply)}`, answer, ms, expected, LIST_SECRETS)
      return await settle(t, 'list', answer, expected, from) && ok
    }), params)
  })

  await t.test('Fetch Appointments as a cancel\'s ownership check', async (t) => {
    const spent = budget(t)
    await fc.assert(fc.asyncProperty(fc.uuid(), fc.nat(), async (target, seed) => {
      if (spent()) return true
      const [reply] = fc.sample(replyArbitrary(listBody(target)), { seed, numRuns: 1 }) as [Reply]
      const from = upstream.received.length
      upstream.handlers.list = (_request, socket) => writeReply(socket, reply)
      upstream.handlers.cancel = NORMAL_CANCEL
      const { answer, ms } = await cancel(target)
      const listed = expectedOf('list', reply)
      let expected = listed
      if (listed.kind === 'list') {
        const owned = listed.items.some((item) => item.id.toLowerCase() === target || item.agentEventId?.toLowerCase() === target)
        expected = owned ? { kind: 'cancelled', message: 'Meeting cancelled successfully' } : err(404, 'APPOINTMENT_NOT_FOUND')
        const cancels = upstream.received.slice(from).filter((request) => request.method === 'POST').length
        if (cancels !== (owned ? 1 : 0)) t.fail(`ownership: ${cancels} cancels sent for ${owned ? 'an owned' : 'an unowned'} appointment`)
      } else if (upstream.received.slice(from).some((request) => request.method === 'POST')) {
        t.fail('a cancel was sent although the ownership check failed')
      }
      const ok = checkAnswer(t, `ownership ${describe(reply)}`, answer, ms, expected, LIST_SECRETS)
      return await settle(t, 'ownership', answer, expected, from) && ok
    }), params)
  })

  await t.test('Cancel', async (t) => {
    const spent = budget(t)
    await fc.assert(fc.asyncProperty(fc.uuid(), replyArbitrary(cancelBody), async (target, reply) => {
      if (spent()) return true
      const from = upstream.received.length
      const body = JSON.stringify({ status: 200, success: true, message: 'ok', data: [{ id: target, end: FUTURE }] })
      upstream.handlers.list = (_request, socket) => {
        socket.end(`HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`)
      }
      upstream.handlers.cancel = (_request, socket) => writeReply(socket, reply)
      const { answer, ms } = await cancel(target)
      const expected = expectedOf('cancel', reply)
      const ok = checkAnswer(t, `cancel ${describe(reply)}`, answer, ms, expected, CANCEL_SECRETS)
      const sent = upstream.received.slice(from).filter((request) => request.method === 'POST')
      const once = sent.length === 1
      if (!once) t.fail(`cancel sent ${sent.length} times`)
      return await settle(t, 'cancel', answer, expected, from) && ok && once
    }), params)
  })

  await t.test('Cancel with an Idempotency-Key: the upstream\'s answer is replayed, an unknown outcome asked again, a 429 released', async (t) => {
    const spent = budget(t)
    await fc.assert(fc.asyncProperty(fc.uuid(), replyArbitrary(cancelBody), async (target, reply) => {
      if (spent()) return true
      const body = JSON.stringify({ status: 200, success: true, message: 'ok', data: [{ id: target, end: FUTURE }] })
      upstream.handlers.list = (_request, socket) => {
        socket.end(`HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`)
      }
      upstream.handlers.cancel = (_request, socket) => writeReply(socket, reply)
      const key = `fuzz-${target}`
      const { answer: first } = await cancel(target, key)
      // The retry meets a well-behaved upstream: whatever it sends is a new call.
      upstream.handlers.cancel = NORMAL_CANCEL
      const from = upstream.received.length
      const { answer: again } = await cancel(target, key)
      const calls = upstream.received.slice(from).map((request) => request.method)
      const code = first.statusCode === 200 ? null : (first.json() as { code: string }).code
      const message = first.statusCode === 200 ? '' : (first.json() as { message: string }).message
      // Unknown: its answer lost, late, or a 2xx that cannot be read (the upstream took the cancel).
      const unknown = code === 'UPSTREAM_TIMEOUT' || (code === 'UPSTREAM_ERROR' && /whether the change was applied is unknown/.test(message))
      let ok: boolean
      if (first.statusCode === 429) {
        // Released: the retry runs, and meets the cooldown without an upstream call.
        ok = again.statusCode === 429 && calls.length === 0
      } else if (unknown) {
        // Sent, its answer lost: a fresh list finds it still there, and the cancel is sent now.
        ok = again.statusCode === 200 && calls.filter((method) => method === 'POST').length === 1
      } else {
        ok = again.statusCode === first.statusCode && again.body === first.body && calls.length === 0
      }
      if (!ok) t.fail(`${describe(reply)}: first ${first.statusCode} ${first.body.slice(0, 100)}, then ${again.statusCode} ${again.body.slice(0, 100)} after ${calls.join(',') || 'no'} calls`)
      if (first.statusCode === 429 || again.statusCode === 429) offset += 11 * 60_000
      return await stillServes(t, 'idempotent cancel') && ok
    }), params)
  })

  await t.test('no log line carries the upstream\'s words (error lines name our own messages only)', async (t) => {
    t.ok(lines.length > 0, 'log lines were written')
    t.equal(lines.filter((line) => line.includes(UPSTREAM_WORDS)).length, 0, `none of ${lines.length} lines`)
  })
})
