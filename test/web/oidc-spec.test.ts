import t from 'tap'
import { Browser } from './browser.js'
import { startWebStack } from './stack.js'
import { BACKCHANNEL_LOGOUT_EVENT } from '../../src/web/backchannel.js'

/**
 * Clauses of the specifications' MUSTs that the other tests do not pin down (an audit against
 * OpenID Connect Core 1.0, Back-Channel Logout 1.0 and RFC 9207).
 */

const EVENTS = { [BACKCHANNEL_LOGOUT_EVENT]: {} }

function signinError (url: string): string | null {
  return new URL(url).searchParams.get('signin_error')
}

t.test('OIDC Core 3.1.3.7 (3): an ID token with an additional untrusted audience is refused (mobile)', async (t) => {
  const stack = await startWebStack(t)
  // "The ID Token MUST be rejected if [...] it contains additional audiences not trusted by the Client."
  const idToken = await stack.signAsIdp({ sub: 'mobile-x', email: 'x@example.com', email_verified: true, aud: [stack.idp.clientId, 'untrusted-client'] })
  const answer = await stack.app.inject({ method: 'POST', url: '/auth/session', payload: { idToken } })
  t.equal(answer.statusCode, 401, 'aud [ours, untrusted] without azp → 401')
  // With azp naming one of ours, the other audiences are the provider's business (oauth4webapi's rule too).
  const withAzp = await stack.signAsIdp({ sub: 'mobile-y', email: 'y@example.com', email_verified: true, aud: [stack.idp.clientId, 'untrusted-client'], azp: stack.idp.clientId })
  t.equal((await stack.app.inject({ method: 'POST', url: '/auth/session', payload: { idToken: withAzp } })).statusCode, 201, 'issued to us (azp) → 201')
})

t.test('Back-Channel Logout 2.6 (4): aud is validated as for ID tokens: an additional untrusted audience is refused', async (t) => {
  const stack = await startWebStack(t)
  const token = await stack.signAsIdp({ sub: 'patient-alice', events: EVENTS, aud: [stack.idp.clientId, 'untrusted-client'] })
  const answer = await stack.app.inject({ method: 'POST', url: '/auth/backchannel-logout', headers: { 'content-type': 'application/x-www-form-urlencoded' }, payload: new URLSearchParams({ logout_token: token }).toString() })
  t.equal(answer.statusCode, 400, 'aud [ours, untrusted] without azp → 400')
  const post = async (claims: Record<string, unknown>) => (await stack.app.inject({ method: 'POST', url: '/auth/backchannel-logout', headers: { 'content-type': 'application/x-www-form-urlencoded' }, payload: new URLSearchParams({ logout_token: await stack.signAsIdp({ sub: 'patient-alice', events: EVENTS, ...claims }) }).toString() })).statusCode
  t.equal(await post({ azp: 'untrusted-client' }), 400, 'issued to another client (azp) → 400')
  t.equal(await post({ aud: [stack.idp.clientId, 'untrusted-client'], azp: stack.idp.clientId }), 200, 'issued to us (azp), with other audiences → 200')
})

t.test('RFC 9207 2.4: an error response whose iss is not our issuer is not taken as the IdP\'s answer', async (t) => {
  const stack = await startWebStack(t)
  const metadata = await (await fetch(`${stack.idp.url}/.well-known/openid-configuration`)).json() as Record<string, unknown>
  t.equal(metadata.authorization_response_iss_parameter_supported, true, 'the IdP advertises RFC 9207')

  // A success response with a foreign iss: openid-client (oauth4webapi validateAuthResponse) refuses it.
  const browser = new Browser()
  const real = new URL(await stack.callbackUrl(browser, 'alice@example.com'))
  t.equal(real.searchParams.get('iss'), stack.idp.url, 'the IdP sends iss')
  real.searchParams.set('iss', 'https://evil.example')
  t.not(signinError((await browser.navigate(real.href)).url), null, 'success response with a foreign iss refused')
  t.equal(stack.sessionOf(browser), undefined)

  // An error response with a foreign iss, or none although the IdP advertises it: "clients MUST
  // reject the authorization response [...] For error responses, clients MUST NOT assume that the
  // error originates from the intended authorization server."
  for (const iss of ['https://evil.example', null]) {
    const other = new Browser()
    const url = new URL(await stack.callbackUrl(other, 'alice@example.com'))
    const forged = new URL(`${stack.publicUrl}/auth/callback`)
    forged.searchParams.set('error', 'access_denied')
    forged.searchParams.set('state', url.searchParams.get('state') as string)
    if (iss !== null) forged.searchParams.set('iss', iss)
    t.not(signinError((await other.navigate(forged.href)).url), 'access_denied', `error with iss ${String(iss)}: not reported as the IdP's access_denied`)
  }
})
