import t, { type Test } from 'tap'
import { buildApp } from '../../src/app.js'
import { loadConfig } from '../../src/config.js'

/**
 * An OPTIONS request from an allowed origin that asks for no method (no
 * Access-Control-Request-Method) is no CORS preflight (Fetch, CORS protocol): it gets the grant of
 * its origin and a bare 204, but none of a preflight's fields, routed or refused before routing
 * alike. And one refused before routing, which no hook sees, has its access line all the same:
 * as what it was answered (204), under the id its answer carries.
 */

const APP_ORIGIN = 'https://app.example.com'
const PREFLIGHT_FIELDS = ['access-control-allow-methods', 'access-control-allow-headers', 'access-control-max-age']

interface Line { msg?: string, reqId?: string, code?: string, res?: { statusCode?: number }, req?: { method?: string } }

async function start (t: Test): Promise<{ server: Awaited<ReturnType<typeof buildApp>>, lines: Line[] }> {
  const lines: Line[] = []
  const server = await buildApp(loadConfig({ CV_API_KEY: 'options-test-key', OIDC_ISSUER: 'http://127.0.0.1:9', OIDC_CLIENT_ID: 'app', LOG_LEVEL: 'info', METRICS_PORT: '0', CORS_ORIGINS: APP_ORIGIN }), {
    logStream: { write (line: string) { lines.push(JSON.parse(line) as Line) } }
  })
  t.teardown(() => server.close())
  await server.ready()
  return { server, lines }
}

t.test('an OPTIONS request without Access-Control-Request-Method gets the grant, not the preflight\'s fields', async (t) => {
  const { server } = await start(t)
  // A routed path (the CORS hook) and one Fastify refuses before routing (answers.ts).
  for (const url of ['/auth/me', '/%zz']) {
    const plain = await server.inject({ method: 'OPTIONS', url, headers: { origin: APP_ORIGIN } })
    t.equal(plain.statusCode, 204, `${url}: a bare 204`)
    t.equal(plain.headers['access-control-allow-origin'], APP_ORIGIN, `${url}: granted`)
    for (const field of PREFLIGHT_FIELDS) t.equal(plain.headers[field], undefined, `${url}: no ${field} without a method asked`)
    // The control: the same request as a preflight gets them.
    const preflight = await server.inject({ method: 'OPTIONS', url, headers: { origin: APP_ORIGIN, 'access-control-request-method': 'POST' } })
    for (const field of PREFLIGHT_FIELDS) t.not(preflight.headers[field], undefined, `${url}: a preflight gets ${field}`)
  }
})

t.test('an OPTIONS request refused before routing has its access line, as the 204 it was answered', async (t) => {
  const { server, lines } = await start(t)
  const answer = await server.inject({ method: 'OPTIONS', url: '/%zz', headers: { origin: APP_ORIGIN, 'access-control-request-method': 'POST' } })
  t.equal(answer.statusCode, 204)
  const refused = lines.filter((line) => line.msg === 'request refused before routing')
  t.equal(refused.length, 1, 'one access line')
  t.equal(refused[0]?.res?.statusCode, 204, 'its status as answered')
  t.equal(refused[0]?.reqId, answer.headers['x-request-id'], 'under the id its answer carries')
  t.equal(refused[0]?.req?.method, 'OPTIONS')
  t.equal(refused[0]?.code, undefined, 'no error code: it was no refusal to its client')
})
