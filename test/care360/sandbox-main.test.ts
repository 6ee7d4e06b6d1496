import t from 'tap'
import { sandboxEnv } from '../../src/care360/sandbox.js'

// sandbox-main.ts itself is process glue (listen, signals), like server.ts: not spawned here,
// because a cold TypeScript child process takes seconds. Its settings are tested instead.

t.test('sandboxEnv: defaults and checks', async (t) => {
  const defaults = sandboxEnv({})
  t.equal(defaults.port, 4010)
  t.match(defaults.options, { apiKey: 'sandbox-key', controlRoutes: true })
  const custom = sandboxEnv({ SANDBOX_PORT: '5000', SANDBOX_API_KEY: 'k', SANDBOX_CONTROL_ROUTES: 'off' })
  t.equal(custom.port, 5000)
  t.match(custom.options, { apiKey: 'k', controlRoutes: false })
  for (const bad of ['x', '70000', '-1', '1.5']) t.throws(() => sandboxEnv({ SANDBOX_PORT: bad }), /SANDBOX_PORT/)
})

t.test('sandboxEnv: the request log carries the path, never the query', async (t) => {
  const logger = sandboxEnv({}).options.logger as { serializers: { req: (r: { method: string, url: string }) => unknown } }
  t.same(logger.serializers.req({ method: 'GET', url: '/api/v1/calendar/appointments?user_email=alice@example.com' }), {
    method: 'GET',
    path: '/api/v1/calendar/appointments'
  })
})
