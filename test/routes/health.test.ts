import t from 'tap'
import { buildTestApp } from '../helpers/app.js'

t.test('readiness: 200 with the shared-state mode, 503 once draining; liveness stays 200', async (t) => {
  const { app } = await buildTestApp(t)
  const ready = await app.inject({ url: '/readyz' })
  t.equal(ready.statusCode, 200)
  t.same(ready.json(), { status: 200, success: true, message: 'OK', data: { ready: true, sharedState: 'memory' } })
  app.draining = true
  const draining = await app.inject({ url: '/readyz' })
  t.equal(draining.statusCode, 503)
  t.same(draining.json(), { status: 503, success: false, message: 'Draining', code: 'SERVICE_UNAVAILABLE', data: { ready: false, sharedState: 'memory' } })
  t.equal(draining.headers.connection, 'close', 'an answer while draining closes its connection')
  const live = await app.inject({ url: '/healthz' })
  t.equal(live.statusCode, 200)
  t.equal(live.headers.connection, 'close')
  t.equal(ready.headers.connection, 'keep-alive', 'before the drain, connections stay open')
})

t.test('close() starts the drain before the listener closes', async (t) => {
  const { app } = await buildTestApp(t)
  let drainingWhenListenerClosed: boolean | null = null
  app.server.once('close', () => { drainingWhenListenerClosed = app.draining })
  await app.listen({ host: '127.0.0.1', port: 0 })
  t.equal(app.draining, false)
  await app.close()
  t.equal(drainingWhenListenerClosed, true)
})
