import type { FastifyInstance } from 'fastify'
import { Type } from 'typebox'
import { ErrorCode, errorEnvelope, ok } from '../errors.js'

const SharedStateMode = Type.Union([Type.Literal('redis'), Type.Literal('degraded'), Type.Literal('memory')])

/** A probe's 200 in the envelope, with `data`. */
const probeAnswer = <T extends ReturnType<typeof Type.Object>>(data: T) => Type.Object({
  status: Type.Integer(),
  success: Type.Boolean(),
  message: Type.String(),
  data
})

const Alive = probeAnswer(Type.Object({}))

const Ready = probeAnswer(Type.Object({ ready: Type.Literal(true), sharedState: SharedStateMode }))

/** An error envelope like any other, with the shared state an operator also reads. */
const Draining = Type.Object({
  status: Type.Literal(503),
  success: Type.Literal(false),
  message: Type.String(),
  code: Type.Literal(ErrorCode.SERVICE_UNAVAILABLE),
  data: Type.Object({ ready: Type.Literal(false), sharedState: SharedStateMode })
}, { description: '`SERVICE_UNAVAILABLE`: shutting down (draining); take this replica out of rotation' })

/** Liveness and readiness for the orchestrator and the load balancer. */
export async function healthRoutes (app: FastifyInstance): Promise<void> {
  app.get('/healthz', {
    schema: { tags: ['operations'], summary: 'Liveness: 200 while the process can serve', response: { 200: Alive } }
  }, async function liveness () {
    return ok({})
  })

  app.get('/readyz', {
    schema: {
      tags: ['operations'],
      summary: 'Readiness: 503 while draining; reports how shared state is held',
      response: { 200: Ready, 503: Draining }
    }
  }, async function readiness (_request, reply) {
    const sharedState = app.sharedState.mode()
    if (app.draining) {
      return reply.code(503).send({ ...errorEnvelope(503, ErrorCode.SERVICE_UNAVAILABLE, 'Draining'), data: { ready: false, sharedState } })
    }
    // A Redis outage is reported but keeps us ready: pulling every replica would turn a
    // degraded service into no service.
    return ok({ ready: true, sharedState })
  })
}
