import t from 'tap'
import { Browser } from './browser.js'
import { loginCookieFor, startWebStack } from './stack.js'
import { buildTestApp } from '../helpers/app.js'

/**
 * The IdP's own error answer (openid-client's AuthorizationResponseError, once its state and RFC
 * 9207 iss are checked) is logged with its cause's summary, as every other failure of the
 * exchange is: the operator can tell it from a forged or stale callback. Dropping the cause from
 * that failSignIn (web/routes.ts) passed every test (found by a mutation review).
 */
t.test('an IdP error answer is logged as idp_error with the AuthorizationResponseError as its cause', async (t) => {
  const stack = await startWebStack(t, { redis: true })
  const lines: string[] = []
  // A replica sharing the store and the login state's key, whose log lines the test reads.
  const replica = await buildTestApp(t, { env: stack.env, redis: stack.redis as NonNullable<typeof stack.redis>, logStream: { write: (line: string) => { lines.push(line) } } })
  const browser = new Browser()
  const url = await stack.callbackUrl(browser, 'alice@example.com')
  const name = loginCookieFor(url)
  const state = new URL(url).searchParams.get('state') as string
  const failed = await replica.app.inject({
    method: 'GET',
    url: `/auth/callback?error=server_error&state=${state}&iss=${encodeURIComponent(stack.idp.url)}`,
    cookies: { [name]: browser.cookie(stack.publicUrl, name) as string }
  })
  t.equal(failed.statusCode, 302)
  t.equal(new URL(failed.headers.location as string).searchParams.get('signin_error'), 'idp_error')
  const line = lines.map((text) => JSON.parse(text) as { msg?: string, signinError?: string, cause?: { name?: string } })
    .find((entry) => entry.msg === 'web sign-in failed' && entry.signinError === 'idp_error')
  t.match(line, { cause: { name: 'AuthorizationResponseError' } }, 'with its cause')
})
