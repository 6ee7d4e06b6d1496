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
  t.same(draining.json(), { status: 503, success: false, message: 'Draining', data: { ready: false, sharedState: 'memory' } })
  t.equal((await app.inject({ url: '/healthz' })).statusCode, 200)
})
