import type { FastifyInstance } from 'fastify'
import { Type } from 'typebox'
import { ErrorCode, ok } from '../errors.js'

const Health = Type.Object({
  status: Type.Integer(),
  success: Type.Boolean(),
  message: Type.String(),
  code: Type.Optional(Type.Literal(ErrorCode.SERVICE_UNAVAILABLE)),
  data: Type.Object({
    ready: Type.Optional(Type.Boolean()),
    sharedState: Type.Optional(Type.Union([Type.Literal('redis'), Type.Literal('degraded'), Type.Literal('memory')]))
  })
})

/** Liveness and readiness for the orchestrator and the load balancer. */
export async function healthRoutes (app: FastifyInstance): Promise<void> {
  app.get('/healthz', {
    schema: { tags: ['operations'], summary: 'Liveness: 200 while the process can serve', response: { 200: Health } }
  }, async function liveness () {
    return ok({})
  })

  app.get('/readyz', {
    schema: {
      tags: ['operations'],
      summary: 'Readiness: 503 while draining; reports how shared state is held',
      response: { 200: Health, 503: Health }
    }
  }, async function readiness (_request, reply) {
    const sharedState = app.sharedState.mode()
    if (app.draining) {
      // An error answer like any other (its `code`), with the shared state an operator also reads.
      return reply.code(503).send({ status: 503, success: false, message: 'Draining', code: ErrorCode.SERVICE_UNAVAILABLE, data: { ready: false, sharedState } })
    }
    // A Redis outage is reported but keeps us ready: pulling every replica would turn a
    // degraded service into no service.
    return ok({ ready: true, sharedState })
  })
}
