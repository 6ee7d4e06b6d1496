import t from 'tap'
import { request } from 'undici'
import { startWebStack } from './stack.js'
import { SECURITY_HEADERS } from '../../src/web/security.js'

/**
 * Fastify's own refusals before routing (a path parameter over 256 characters, a malformed
 * percent-encoding in the path) are answers like any other to a web app calling from an allowed
 * origin: without the CORS grant its script gets an opaque network error instead of the 400
 * VALIDATION_FAILED every other bad cancel gets, and an HTTP cache would not know the answer
 * depends on Origin. Real sockets: these answers never pass through inject's routing either.
 */

const APP_ORIGIN = 'https://app.example.com'
const CANCEL_PREFLIGHT = { 'access-control-request-method': 'POST', 'access-control-request-headers': 'content-type, x-csrf' }

t.test('refusals before routing carry the CORS grant of the origin that asked', async (t) => {
  const stack = await startWebStack(t, { env: { CORS_ORIGINS: APP_ORIGIN } })
  async function send (method: 'GET' | 'POST' | 'OPTIONS', path: string, headers: Record<string, string>) {
    const answer = await request(`${stack.publicUrl}${path}`, { method, headers, headersTimeout: 5000, bodyTimeout: 5000 })
    return { status: answer.statusCode, headers: answer.headers, body: await answer.body.text() }
  }

  for (const [name, path] of [['a path parameter over 256 characters', `/appointments/${'a'.repeat(300)}/cancel`], ['a malformed percent-encoding', '/appointments/%E0%A4%A/cancel']] as const) {
    t.test(name, async (t) => {
      // The browser's preflight for the app's cancel, then the cancel itself.
      const preflight = await send('OPTIONS', path, { origin: APP_ORIGIN, ...CANCEL_PREFLIGHT })
      t.equal(preflight.status, 204, 'the preflight is answered as any other (it asks nothing of the path)')
      t.equal(preflight.headers['access-control-allow-origin'], APP_ORIGIN, 'preflight: granted')
      t.equal(preflight.headers['access-control-allow-credentials'], 'true')
      t.match(preflight.headers['access-control-allow-headers'], /x-csrf/)
      t.match(preflight.headers.vary, /Origin/)
      t.match(preflight.headers, SECURITY_HEADERS, 'the security headers of every answer')
      t.equal(preflight.headers['content-length'], '0')

      const cancel = await send('POST', path, { origin: APP_ORIGIN, 'x-csrf': '1' })
      t.equal(cancel.status, 400)
      t.match(JSON.parse(cancel.body), { code: 'VALIDATION_FAILED' })
      t.equal(cancel.headers['access-control-allow-origin'], APP_ORIGIN, 'the 400 is readable by the app')
      t.equal(cancel.headers['access-control-allow-credentials'], 'true')
      t.match(cancel.headers['access-control-expose-headers'], /x-request-id/)
      t.match(cancel.headers.vary, /Origin/, 'Vary: Origin')
      t.equal(cancel.headers['cache-control'], 'no-store')

      const foreign = await send('POST', path, { origin: 'https://evil.example', 'x-csrf': '1' })
      t.equal(foreign.status, 400)
      t.equal(foreign.headers['access-control-allow-origin'], undefined, 'a foreign origin gets no grant')
      t.match(foreign.headers.vary, /Origin/, 'but the answer still varies by Origin')

      const mobile = await send('POST', path, {})
      t.equal(mobile.status, 400)
      t.equal(mobile.headers['access-control-allow-origin'], undefined)
      t.equal(mobile.headers.vary, undefined, 'no Origin, no CORS fields (as on every other answer)')
    })
  }
  // The control: the same cancel with a short bad id is readable.
  const short = await send('POST', '/appointments/abc/cancel', { origin: APP_ORIGIN, 'x-csrf': '1' })
  t.equal(short.headers['access-control-allow-origin'], APP_ORIGIN, 'control: a short bad id is answered with the grant')
})
