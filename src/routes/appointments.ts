import type { FastifyInstance, FastifyReply, FastifyRequest, HookHandlerDoneFunction } from 'fastify'
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox'
import { ApiError, ErrorCode, ok } from '../errors.js'
import { createOwnershipCache, listedIdOf } from '../appointments/ownership.js'
import { endOf, UpstreamError, type Appointment } from '../care360/client.js'
import {
  createIdempotency, idempotencyStoreFor, inFlightTtlFor, parseIdempotencyKey, type Answer, type Attempt, type EarlierAnswer
} from '../idempotency/index.js'
import {
  AppointmentList, CancelAnswer, CancelBody, CancelParams, UUID_PATTERN, errorAnswers
} from '../schemas/appointments.js'
import type { Static } from 'typebox'

type CancelAnswerBody = Static<typeof CancelAnswer>

declare module 'fastify' {
  interface FastifyRequest {
    /** The upstream's HTTP status for this request's cancel, when one was sent (audit). */
    upstreamStatus: number | null
    /** Whose answer this cancel got, when not its own upstream call's (audit). */
    earlierAnswer: EarlierAnswer | null
    /**
     * The appointment's `id` as the upstream lists it, once this request (or the earlier attempt a
     * confirmation stands for) found it in the patient's list (audit).
     */
    listedAppointment: string | null
  }
}

const UUID = new RegExp(UUID_PATTERN)

function toPatientAppointment (item: Appointment) {
  return {
    id: item.id,
    agentEventId: item.agentEventId,
    title: item.title,
    topic: item.topic,
    start: item.start,
    end: item.end,
    status: item.status,
    agentName: item.agentName
  }
}

/**
 * Whether a failed cancel may have taken effect. Nothing happened when our own refusal stopped it
 * before it left (the gate's budget or cooldown, the idempotency record: ApiErrors that are not the
 * upstream's) or when it never reached the upstream; anything else, our own bugs included, may.
 */
function mayHaveCancelled (error: unknown): boolean {
  if (error instanceof UpstreamError) return error.outcome !== 'not-sent'
  return !(error instanceof ApiError)
}

/** The patient's appointments: list, and cancel (the contract's cancel route, steps 4 to 9). */
export async function appointmentRoutes (fastify: FastifyInstance): Promise<void> {
  const app = fastify.withTypeProvider<TypeBoxTypeProvider>()
  const { care360, config } = app
  const ownership = createOwnershipCache({
    fetch: (email, requestId) => care360.fetchAppointments(email, { requestId })
  })

  const idempotency = createIdempotency({
    store: idempotencyStoreFor(app.sharedState),
    replicated: app.sharedState.redis !== null,
    inFlightTtlMs: inFlightTtlFor(config.care360.timeoutMs),
    warnings: app.repeatedWarnings,
    stopping: () => app.draining
  })

  app.decorateRequest('upstreamStatus', null)
  app.decorateRequest('earlierAnswer', null)
  app.decorateRequest('listedAppointment', null)

  app.get('/appointments', {
    config: { auth: 'required' },
    schema: {
      tags: ['appointments'],
      summary: "The signed-in patient's upcoming appointments",
      security: [{ bearer: [] }, { cookie: [] }],
      response: { 200: AppointmentList, ...errorAnswers(400, 401, 429, 502, 503, 504) }
    }
  }, async function listAppointments (request) {
    const { email } = request.session!
    const appointments = await ownership.list(email, request.id)
    return ok(appointments.map(toPatientAppointment), 'Appointments fetched successfully')
  })

  /**
   * Steps 6 to 8 for one cancel: ownership (never send a cancel for an appointment that is not
   * the patient's own), then the upstream call, whose gate draws the org budget.
   */
  async function sendCancel (request: FastifyRequest, appointmentId: string, reason: string | undefined, attempt: Attempt): Promise<Answer> {
    const { email } = request.session!
    // Without a list to take the upstream's spelling from, the canonical one (RFC 9562, 4: lower case).
    let forwardedId = appointmentId.toLowerCase()
    let owned: Appointment | null = null
    if (config.ownershipCheck) {
      owned = await ownership.find(email, appointmentId, request.id)
      if (owned === null) {
        throw new ApiError(404, ErrorCode.APPOINTMENT_NOT_FOUND, 'No such upcoming appointment')
      }
      // The same UUID, spelled as the upstream lists it: `:id` is accepted in either case, and a
      // case-sensitive upstream would refuse another spelling of its own id.
      forwardedId = listedIdOf(owned, appointmentId) as string
      request.listedAppointment = owned.id
    }
    let answer
    try {
      answer = await attempt.send(() => care360.cancelAppointment(
        reason === undefined ? { email, appointmentId: forwardedId } : { email, appointmentId: forwardedId, reason },
        { requestId: request.id }
      ), owned === null ? null : endOf(owned), owned?.id ?? null)
    } catch (error) {
      // A refusal of the gate (budget, cooldown) never reached the upstream.
      request.upstreamStatus = error instanceof UpstreamError ? error.upstreamStatus : null
      // The cancel may have happened: the patient's list is fetched afresh next time.
      if (mayHaveCancelled(error)) ownership.forget(email)
      throw error
    }
    // It happened: the cached list stays warm for the patient's next cancel, without this one.
    if (owned === null) ownership.forget(email)
    else ownership.cancelled(email, owned)
    request.upstreamStatus = answer.status
    return { statusCode: 200, body: answer }
  }

  // One audit record per cancel attempt, whatever stopped it: who (a keyed hash, never the email),
  // which appointment, the outcome and the upstream's status. Never the reason. It is written in
  // the request's access line (logging.ts), which runs after this hook. The appointment is named
  // by its listed `id` once the patient's list showed it: the path may name it by its
  // `agentEventId`, and a trail counts cancelled appointments by one name each.
  function auditCancel (request: FastifyRequest, reply: FastifyReply, done: HookHandlerDoneFunction): void {
    const id = (request.params as { id?: string }).id
    request.audit = {
      event: 'appointment.cancel',
      requestId: request.id,
      patient: request.patient,
      appointmentId: request.listedAppointment?.toLowerCase() ?? (id !== undefined && UUID.test(id) ? id.toLowerCase() : null),
      outcome: reply.statusCode === 200 ? 'cancelled' : reply.errorCode,
      status: reply.statusCode,
      upstreamStatus: request.upstreamStatus,
      // Set when the answer is an earlier request's (a replay, a confirmation, a shared answer):
      // a trail that counts cancels counts the audits without it.
      earlier: request.earlierAnswer
    }
    done()
  }

  app.post('/appointments/:id/cancel', {
    // Step 3: cancels per session, after the per-IP and per-session limits (the limit hooks).
    config: { auth: 'required', cancelLimit: true },
    schema: {
      tags: ['appointments'],
      summary: "Cancel one of the signed-in patient's upcoming appointments",
      security: [{ bearer: [] }, { cookie: [] }],
      params: CancelParams,
      body: CancelBody,
      response: {
        200: CancelAnswer,
        ...errorAnswers(400, 401, 403, 404, 409, 413, 415, 422, 429, 502, 503, 504)
      }
    },
    onResponse: auditCancel,
    // The body is optional: no body at all means no reason.
    preValidation: function absentBodyIsEmpty (request, _reply, done) {
      if (request.body === undefined) request.body = {}
      done()
    }
  }, async function cancelAppointment (request, reply) {
    // Step 5 comes first in the handler: a malformed key is refused before anything else runs.
    const key = parseIdempotencyKey(request.headers['idempotency-key'])
    const { email } = request.session!
    const appointmentId = request.params.id
    const reason = request.body.reason
    const { answer, earlier } = await idempotency.handle({
      scope: request.patient!,
      key,
      appointmentId,
      reason,
      log: request.log,
      run: (attempt) => sendCancel(request, appointmentId, reason, attempt),
      // An identical cancel's failure, answered to this one too: its audit record says whose.
      sharedFailure: () => { request.earlierAnswer = 'shared' },
      resolveUnknown: async function resolveUnknown (endsAt, listed) {
        // Without the ownership check the appointment was never seen in the patient's list, so
        // its absence proves nothing (it may never have been theirs): the upstream, which
        // enforces ownership itself, answers a new send ("already cancelled" if the first went).
        if (!config.ownershipCheck) return 'send'
        // With it, the appointment was listed before the first send. A fresh list, never the
        // ownership cache: it decides whether that cancel happened. Unless the appointment has
        // ended since: then it is absent either way, and nothing shows the cancel took effect (the
        // send that follows finds it no longer upcoming: a 404, never a confirmation).
        if (await ownership.findFresh(email, appointmentId, request.id) !== null) return 'send'
        if (endsAt !== null && endsAt <= Date.now()) return 'send'
        // Confirmed: audited under the id the first attempt found it by.
        request.listedAppointment = listed
        return 'cancelled'
      }
    })
    request.earlierAnswer = earlier
    // Every answer but a 200 is an error envelope (replayed ones too): its code is for the audit.
    if (answer.statusCode !== 200) reply.errorCode = (answer.body as { code: ErrorCode }).code
    if (answer.headers !== undefined) reply.headers(answer.headers)
    return reply.code(answer.statusCode as 200).send(answer.body as CancelAnswerBody)
  })
}
