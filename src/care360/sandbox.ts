import { randomUUID } from 'node:crypto'
import { STATUS_CODES } from 'node:http'
import { Readable } from 'node:stream'
import { finished } from 'node:stream/promises'
import { setTimeout as sleep } from 'node:timers/promises'
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest, type FastifyServerOptions } from 'fastify'
import { Type, type Static } from 'typebox'
import { Value } from 'typebox/value'

/**
 * A local imitation of the Care360 Next calendar endpoints, faithful to the vendor's documentation
 * (shared/care360/*.md): app developers, the demo and the tests run against it. Where the
 * documentation is silent, the choices are noted beside the code. It can also misbehave on
 * demand (setFailure) the way a real upstream does in production.
 */

const CANCEL_PATH = '/api/v1/calendar/appointments/cancel'
const LIST_PATH = '/api/v1/calendar/appointments'

/** An appointment item as the upstream lists it (the documentation's example). */
export interface SandboxAppointment {
  id: string
  createdAt: string
  updatedAt: string
  title: string
  start: string
  end: string
  topic: string
  description: string
  color: string
  isEditable: boolean
  agentEventId: string
  agentName: string
  status: string
  isDeleted: boolean
  meetingDetails: Record<string, unknown>
  case: { id: string }
}

export interface SeedAppointment {
  id: string
  agentEventId: string
  title: string
  topic: string
  agentName: string
  /** Start, relative to the moment the sandbox is seeded. */
  startsInMinutes: number
  durationMinutes: number
}

export interface SeedPatient {
  email: string
  name: string
  appointments: SeedAppointment[]
}

const HOUR = 60
const DAY = 24 * HOUR

/** The default seed: fixed ids so that demos and docs can name them; times follow the clock. */
export const DEMO_PATIENTS: readonly SeedPatient[] = Object.freeze([
  {
    email: 'alice@example.com',
    name: 'Alice Patient',
    appointments: [
      { id: '3f0b5d2e-8a41-4c1e-9f27-1a6d3c8e5b01', agentEventId: 'a1c4e7f0-2b5d-4e8a-b1c4-7f0a2b5d8e01', title: 'Follow-up consultation', topic: 'Weight management', agentName: 'Dr. Grace Hopper', startsInMinutes: DAY + 2 * HOUR, durationMinutes: 30 },
      { id: '3f0b5d2e-8a41-4c1e-9f27-1a6d3c8e5b02', agentEventId: 'a1c4e7f0-2b5d-4e8a-b1c4-7f0a2b5d8e02', title: 'Lab results review', topic: 'Blood panel', agentName: 'Dr. Ada Lovelace', startsInMinutes: 3 * DAY, durationMinutes: 20 },
      { id: '3f0b5d2e-8a41-4c1e-9f27-1a6d3c8e5b03', agentEventId: 'a1c4e7f0-2b5d-4e8a-b1c4-7f0a2b5d8e03', title: 'Nutrition coaching', topic: 'Diet plan', agentName: 'Sam Coach', startsInMinutes: 7 * DAY, durationMinutes: 45 }
    ]
  },
  {
    email: 'bob@example.com',
    name: 'Bob Patient',
    appointments: [
      { id: '7c2e9a14-5b3f-4d8e-a6c1-2e9f4b7d0c01', agentEventId: 'b2d5f8a1-3c6e-4f9b-82d5-8a1b3c6e9f01', title: 'Initial consultation', topic: 'Onboarding', agentName: 'Dr. Grace Hopper', startsInMinutes: 4 * HOUR, durationMinutes: 30 },
      { id: '7c2e9a14-5b3f-4d8e-a6c1-2e9f4b7d0c02', agentEventId: 'b2d5f8a1-3c6e-4f9b-82d5-8a1b3c6e9f02', title: 'Prescription check', topic: 'Medication', agentName: 'Dr. Ada Lovelace', startsInMinutes: 2 * DAY, durationMinutes: 15 },
      { id: '7c2e9a14-5b3f-4d8e-a6c1-2e9f4b7d0c03', agentEventId: 'b2d5f8a1-3c6e-4f9b-82d5-8a1b3c6e9f03', title: 'Monthly check-in', topic: 'Progress', agentName: 'Sam Coach', startsInMinutes: 30 * DAY, durationMinutes: 30 }
    ]
  },
  { email: 'carol@example.com', name: 'Carol Patient', appointments: [] }
])

const Endpoint = Type.Optional(Type.Union([Type.Literal('cancel'), Type.Literal('list'), Type.Literal('any')]))
const Times = Type.Optional(Type.Integer({ minimum: 1 }))
const Delay = Type.Integer({ minimum: 0, maximum: 600_000 })

/** A failure mode, as accepted by setFailure and POST /__sandbox/failure. */
export const FailureSchema = Type.Union([
  Type.Object({ kind: Type.Literal('status'), status: Type.Integer({ minimum: 100, maximum: 599 }), body: Type.Optional(Type.Unknown()), headers: Type.Optional(Type.Record(Type.String(), Type.String())), endpoint: Endpoint, times: Times }),
  // Answers late, then normally; the change is not applied if the caller gave up meanwhile.
  Type.Object({ kind: Type.Literal('slow'), delayMs: Delay, endpoint: Endpoint, times: Times }),
  // Destroys the socket on receipt: nothing applied.
  Type.Object({ kind: Type.Literal('reset'), endpoint: Endpoint, times: Times }),
  // Applies the change, then destroys the socket: done, but the caller cannot know.
  Type.Object({ kind: Type.Literal('reset-after-apply'), endpoint: Endpoint, times: Times }),
  Type.Object({ kind: Type.Literal('slow-after-apply'), delayMs: Delay, endpoint: Endpoint, times: Times }),
  Type.Object({ kind: Type.Literal('garbage'), endpoint: Endpoint, times: Times }),
  Type.Object({ kind: Type.Literal('huge'), endpoint: Endpoint, times: Times }),
  // retryAfter: the header's raw value (seconds or an HTTP-date); null omits it; default '1'.
  Type.Object({ kind: Type.Literal('rate-limited'), retryAfter: Type.Optional(Type.Union([Type.String(), Type.Null()])), endpoint: Endpoint, times: Times })
])

export type Failure = Static<typeof FailureSchema>

export interface RecordedCall {
  method: string
  path: string
  query: Record<string, string | string[]>
  /** Every header as received, names lower-cased. */
  headers: Record<string, string | string[]>
  /** The JSON body parsed, the raw text when it is not JSON, undefined when empty. */
  body: unknown
  at: number
}

export interface SandboxControl {
  /**
   * The requests that reached the calendar endpoints, in order: the latest ones, at least
   * `maxRecordedCalls` and fewer than twice as many (a long-running demo would otherwise keep
   * every call it was ever sent).
   */
  readonly calls: RecordedCall[]
  /** Back to the seed: calls, failures, quota and cancellations forgotten. */
  reset (): void
  seedAppointment (email: string, partial?: Partial<SandboxAppointment>): SandboxAppointment
  isCancelled (id: string): boolean
  setFailure (failure: Failure): void
  clearFailure (): void
}

export interface SandboxOptions {
  apiKey: string
  /** The organization's quota over both calendar endpoints; documented as 500 per 60 s. */
  quota?: { count: number, windowMs: number, sendRetryAfter?: boolean }
  seed?: readonly SeedPatient[]
  /** Exposes POST /__sandbox/failure and POST /__sandbox/reset (for the demo); off by default. */
  controlRoutes?: boolean
  logger?: FastifyServerOptions['logger']
  /** How many recorded calls are kept at least (SandboxControl.calls); 10 000 by default, 0 keeps none. */
  maxRecordedCalls?: number
}

/**
 * The un-listened app and its control. Not the instance decorated with the control: a Fastify
 * instance is thenable, so an async builder returning it would resolve to a readied instance
 * typed without the decoration.
 */
export interface Sandbox {
  app: FastifyInstance
  control: SandboxControl
}

interface Stored {
  item: SandboxAppointment
  email: string
  cancelled: boolean
  reason: string | undefined
}

type Kind = 'cancel' | 'list'

type AfterApply = Extract<Failure, { kind: 'reset-after-apply' | 'slow-after-apply' }>

function envelope (status: number, message: string, error?: string): Record<string, unknown> {
  const body: Record<string, unknown> = { status, success: status < 400, message }
  if (error !== undefined) body.error = error
  return body
}

function invalid (reply: FastifyReply, error: string): FastifyReply {
  return reply.code(400).send(envelope(400, 'Invalid request', error))
}

function firstString (value: unknown): string | undefined {
  if (Array.isArray(value)) return firstString(value[0])
  return typeof value === 'string' ? value : undefined
}

function parseDay (text: string): number | null {
  if (!/^\d{4}-\d{2}-\d{2}$/.test(text)) return null
  const at = Date.parse(`${text}T00:00:00Z`)
  // Date.parse accepts 2024-02-30; a real calendar day must print back the same.
  if (Number.isNaN(at) || new Date(at).toISOString().slice(0, 10) !== text) return null
  return at
}

function hugeBody (): Readable {
  const item = JSON.stringify({ id: randomUUID(), title: 'x'.repeat(1000), start: null, end: null })
  async function * chunks (): AsyncGenerator<string> {
    yield '{"status":200,"success":true,"message":"Appointments fetched successfully","data":['
    // About 1.3 MB (1.24 MiB): over the client's cap of a list (1 MiB), as of a cancel's answer.
    for (let i = 0; i < 1200; i++) yield `${i === 0 ? '' : ','}${item}`
    yield ']}'
  }
  return Readable.from(chunks())
}

/**
 * Options of the hand-run sandbox (sandbox-main.ts) from its environment: SANDBOX_PORT (4010),
 * SANDBOX_API_KEY ('sandbox-key'), SANDBOX_CONTROL_ROUTES ('on' unless 'off': the entry exists for
 * demos and manual runs, on loopback only).
 */
export function sandboxEnv (env: Record<string, string | undefined>): { port: number, options: SandboxOptions } {
  const port = Number(env.SANDBOX_PORT ?? '4010')
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new Error('SANDBOX_PORT must be a port number')
  return {
    port,
    options: {
      apiKey: env.SANDBOX_API_KEY ?? 'sandbox-key',
      controlRoutes: env.SANDBOX_CONTROL_ROUTES !== 'off',
      logger: {
        level: 'info',
        // The query carries the patient's email: log the path only.
        serializers: { req: (request: { method: string, url: string }) => ({ method: request.method, path: request.url.split('?')[0] }) }
      }
    }
  }
}

export async function buildSandbox (options: SandboxOptions): Promise<Sandbox> {
  const quota = { count: 500, windowMs: 60_000, sendRetryAfter: true, ...options.quota }
  const seed = options.seed ?? DEMO_PATIENTS
  // A fake upstream has no work worth draining: closing drops every socket, keep-alive or not, so
  // that tests and demos never wait on a client's idle connection.
  const app = Fastify({ logger: options.logger ?? false, forceCloseConnections: true })

  const calls: RecordedCall[] = []
  const maxRecordedCalls = options.maxRecordedCalls ?? 10_000
  const patients = new Map<string, string>()
  const appointments = new Map<string, Stored>()
  // Sliding log of accepted calls per organization (one organization: one key).
  let quotaLog: number[] = []
  let failure: Failure | null = null
  const afterApply = new WeakMap<FastifyRequest, AfterApply>()

  function makeAppointment (email: string, partial: Partial<SandboxAppointment> = {}): SandboxAppointment {
    const now = Date.now()
    const start = partial.start ?? new Date(now + DAY * 60_000).toISOString()
    const end = partial.end ?? new Date(Date.parse(start) + 30 * 60_000).toISOString()
    const item: SandboxAppointment = {
      id: randomUUID(),
      createdAt: new Date(now).toISOString(),
      updatedAt: new Date(now).toISOString(),
      title: 'Appointment',
      topic: 'Consultation',
      description: 'Appointment with your care team',
      color: '#4F46E5',
      isEditable: true,
      agentEventId: randomUUID(),
      agentName: 'Care Team',
      status: 'CONFIRMED',
      isDeleted: false,
      meetingDetails: {},
      case: { id: randomUUID() },
      ...partial,
      start,
      end
    }
    const key = email.toLowerCase()
    if (!patients.has(key)) patients.set(key, email)
    appointments.set(item.id, { item, email: key, cancelled: false, reason: undefined })
    return item
  }

  function applySeed (): void {
    patients.clear()
    appointments.clear()
    const now = Date.now()
    for (const patient of seed) {
      patients.set(patient.email.toLowerCase(), patient.name)
      for (const a of patient.appointments) {
        const start = new Date(now + a.startsInMinutes * 60_000)
        const end = new Date(start.getTime() + a.durationMinutes * 60_000)
        makeAppointment(patient.email, {
          id: a.id,
          agentEventId: a.agentEventId,
          title: a.title,
          topic: a.topic,
          agentName: a.agentName,
          description: `${a.title} with ${a.agentName}`,
          start: start.toISOString(),
          end: end.toISOString()
        })
      }
    }
  }

  function takeFailure (kind: Kind): Failure | null {
    if (failure === null) return null
    const endpoint = failure.endpoint ?? 'any'
    if (endpoint !== 'any' && endpoint !== kind) return null
    const taken = failure
    if (taken.times !== undefined) {
      if (taken.times <= 1) failure = null
      else failure = { ...taken, times: taken.times - 1 }
    }
    return taken
  }

  const control: SandboxControl = {
    calls,
    reset () {
      calls.length = 0
      quotaLog = []
      failure = null
      applySeed()
    },
    seedAppointment: makeAppointment,
    isCancelled (id) {
      return appointments.get(id)?.cancelled === true
    },
    setFailure (next) {
      if (!Value.Check(FailureSchema, next)) throw new TypeError('not a sandbox failure mode')
      failure = next
    },
    clearFailure () {
      failure = null
    }
  }
  applySeed()

  function destroy (request: FastifyRequest, reply: FastifyReply): FastifyReply {
    reply.hijack()
    request.raw.socket.destroy()
    return reply
  }

  /** Ends an applied request, unless a failure mode wants the answer lost or late. */
  async function finish (request: FastifyRequest, reply: FastifyReply, status: number, body: unknown): Promise<FastifyReply> {
    const after = afterApply.get(request)
    if (after?.kind === 'reset-after-apply') return destroy(request, reply)
    if (after?.kind === 'slow-after-apply') await sleep(after.delayMs)
    return reply.code(status).send(body)
  }

  async function misbehave (request: FastifyRequest, reply: FastifyReply, kind: Kind): Promise<FastifyReply | null> {
    const mode = takeFailure(kind)
    if (mode === null) return null
    switch (mode.kind) {
      case 'status': {
        const body = mode.body ?? envelope(mode.status, STATUS_CODES[mode.status] ?? 'Unknown')
        reply.code(mode.status).headers(mode.headers ?? {})
        if (typeof body === 'string') return reply.type(mode.headers?.['content-type'] ?? 'text/plain').send(body)
        return reply.send(body)
      }
      case 'slow':
        await sleep(mode.delayMs)
        // Like most servers, it stops working on a request whose caller has hung up.
        if (request.raw.socket.destroyed) return destroy(request, reply)
        return null
      case 'reset':
        return destroy(request, reply)
      case 'garbage':
        return reply.code(200).type('text/html').send('<html><body><h1>502 Bad Gateway</h1></body></html>')
      case 'huge':
        return reply.code(200).type('application/json').send(hugeBody())
      case 'rate-limited':
        if (mode.retryAfter !== null) reply.header('retry-after', mode.retryAfter ?? '1')
        return reply.code(429).send(envelope(429, 'Rate limit exceeded'))
      default:
        afterApply.set(request, mode)
        return null
    }
  }

  function overQuota (reply: FastifyReply): FastifyReply | null {
    const now = Date.now()
    quotaLog = quotaLog.filter((at) => at > now - quota.windowMs)
    if (quotaLog.length < quota.count) {
      quotaLog.push(now)
      return null
    }
    if (quota.sendRetryAfter) {
      const oldest = quotaLog[0] as number
      reply.header('retry-after', String(Math.max(1, Math.ceil((oldest + quota.windowMs - now) / 1000))))
    }
    return reply.code(429).send(envelope(429, 'Rate limit exceeded'))
  }

  async function gatekeeper (request: FastifyRequest, reply: FastifyReply): Promise<FastifyReply | undefined> {
    const url = new URL(request.url, 'http://sandbox')
    const headers: Record<string, string | string[]> = {}
    for (const [name, value] of Object.entries(request.headers)) {
      if (value !== undefined) headers[name.toLowerCase()] = value
    }
    const raw = request.body as string | undefined
    let body: unknown
    if (raw !== undefined && raw !== '') {
      try { body = JSON.parse(raw) } catch { body = raw }
    }
    calls.push({ method: request.method, path: url.pathname, query: request.query as Record<string, string | string[]>, headers, body, at: Date.now() })
    // The oldest half goes at once, not one call per request (each removal moves the array); at 0, each.
    if (calls.length >= 2 * maxRecordedCalls) calls.splice(0, calls.length - maxRecordedCalls)

    const kind: Kind = url.pathname === CANCEL_PATH ? 'cancel' : 'list'
    // Infrastructure faults happen in front of the application: before auth and quota.
    const failed = await misbehave(request, reply, kind)
    if (failed !== null) {
      // A streamed answer (huge) is not sent, to Fastify, until it ends: the route's handler would
      // run meanwhile (and apply the cancel) if the hook returned now.
      await finished(reply.raw).catch(() => {})
      return failed
    }
    if (request.headers['cv-api-key'] !== options.apiKey) {
      return reply.code(401).send(envelope(401, 'Unauthorized'))
    }
    return overQuota(reply) ?? undefined
  }

  async function listAppointments (request: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> {
    const query = request.query as Record<string, unknown>
    const email = firstString(query.user_email)
    const startText = firstString(query.start_date)
    const endText = firstString(query.end_date)
    let range: [number, number] | null = null
    if (email === '') return invalid(reply, 'user_email must not be empty')
    if (startText !== undefined || endText !== undefined || email === undefined) {
      if (startText === undefined || endText === undefined) {
        return invalid(reply, email === undefined
          ? 'start_date and end_date are required when user_email is absent'
          : 'start_date and end_date must be given together')
      }
      const from = parseDay(startText)
      const to = parseDay(endText)
      if (from === null || to === null) return invalid(reply, 'start_date and end_date must be dates in YYYY-MM-DD format')
      if (from > to) return invalid(reply, 'start_date must not be after end_date')
      range = [from, to + DAY * 60_000]
    }
    const key = email?.toLowerCase()
    if (key !== undefined && !patients.has(key)) {
      // Documented only as a "NotFoundError"; its status and body are inferred.
      return reply.code(404).send(envelope(404, 'NotFoundError', 'User not found'))
    }
    const now = Date.now()
    const data = [...appointments.values()]
      // Documented: only appointments that are not deleted and have not ended; never cancelled ones.
      .filter((stored) => !stored.cancelled && !stored.item.isDeleted && Date.parse(stored.item.end) > now)
      .filter((stored) => key === undefined || stored.email === key)
      .filter((stored) => {
        if (range === null) return true
        const start = Date.parse(stored.item.start)
        return start >= range[0] && start < range[1]
      })
      .sort((a, b) => Date.parse(a.item.end) - Date.parse(b.item.end))
      .map((stored) => stored.item)
    return finish(request, reply, 200, { ...envelope(200, 'Appointments fetched successfully'), data })
  }

  async function cancelAppointment (request: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> {
    const type = (request.headers['content-type'] ?? '').split(';')[0]?.trim().toLowerCase()
    if (type !== 'application/json') return invalid(reply, 'Content-Type must be application/json')
    let body: unknown
    try {
      body = JSON.parse(request.body as string)
    } catch {
      return invalid(reply, 'Body must be valid JSON')
    }
    if (typeof body !== 'object' || body === null || Array.isArray(body)) return invalid(reply, 'Body must be a JSON object')
    const { email, appointmentId, reason } = body as Record<string, unknown>
    if (typeof email !== 'string' || email === '') return invalid(reply, 'email is required and must be a string')
    if (typeof appointmentId !== 'string' || appointmentId === '') return invalid(reply, 'appointmentId is required and must be a string')
    if (reason !== undefined && typeof reason !== 'string') return invalid(reply, 'reason must be a string')
    // The documentation does not say which id cancel takes; the sandbox accepts either.
    const stored = appointments.get(appointmentId) ??
      [...appointments.values()].find((candidate) => candidate.item.agentEventId === appointmentId)
    if (stored === undefined || stored.item.isDeleted) return invalid(reply, 'Appointment not found')
    if (stored.email !== email.toLowerCase()) return invalid(reply, 'Appointment does not belong to this invitee')
    if (stored.cancelled) return invalid(reply, 'Appointment is already cancelled')
    if (Date.parse(stored.item.end) <= Date.now()) return invalid(reply, 'Appointment has already ended')
    stored.cancelled = true
    stored.reason = reason
    stored.item.updatedAt = new Date().toISOString()
    return finish(request, reply, 200, envelope(200, 'Meeting cancelled successfully'))
  }

  app.setNotFoundHandler(function notFound (_request, reply) {
    return reply.code(404).send(envelope(404, 'Not Found'))
  })
  app.setErrorHandler(function sandboxError (error: { statusCode?: number, message: string }, _request, reply) {
    // Set before the routes, which inherit it. The framework's client errors (413 and the like)
    // keep their status; anything else is a bug.
    const status = error.statusCode ?? 500
    return reply.code(status).send(envelope(status, status === 500 ? 'Internal server error' : error.message))
  })

  await app.register(async function calendarRoutes (scope) {
    // The body is read as text and judged by the handlers, so that a wrong content type or bad
    // JSON gets the upstream's 400 envelope rather than the framework's error.
    scope.removeAllContentTypeParsers()
    scope.addContentTypeParser('*', { parseAs: 'string' }, function keepText (_request, text, done) {
      done(null, text)
    })
    scope.addHook('preHandler', gatekeeper)
    scope.get(LIST_PATH, listAppointments)
    scope.post(CANCEL_PATH, cancelAppointment)
  })

  if (options.controlRoutes === true) {
    await app.register(async function controlRoutes (scope) {
      scope.post('/__sandbox/failure', async function setFailure (request, reply) {
        const body = request.body as { kind?: unknown } | undefined
        if (body?.kind === 'none') {
          control.clearFailure()
          return envelope(200, 'Failure cleared')
        }
        if (!Value.Check(FailureSchema, body)) return invalid(reply, 'not a sandbox failure mode')
        control.setFailure(body)
        return envelope(200, 'Failure set')
      })
      scope.post('/__sandbox/reset', async function reset () {
        control.reset()
        return envelope(200, 'Sandbox reset')
      })
    })
  }

  return { app, control }
}
