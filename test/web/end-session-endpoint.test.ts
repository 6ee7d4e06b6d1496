import t from 'tap'
import * as client from 'openid-client'
import { endSessionUrlOf } from '../../src/web/plugin.js'

/**
 * The web app sends the browser to the end-session URL a sign-out answers with; the provider's
 * discovery document names the endpoint. openid-client builds the URL for an https endpoint only
 * (or plain http where the configuration allows it: the development IdP's on loopback), and throws
 * for any other. A sign-out never fails on the IdP: such an endpoint gives no URL, on both paths
 * (a live session's sign-out, and a cookie whose session had ended, which has no catch of its own).
 */
t.test('an end-session endpoint openid-client will not build gives no URL, and no error', async (t) => {
  const oidc = { clientId: 'patient-web', postLogoutRedirectUri: 'https://app.example.com' }
  const configuration = (endpoint?: string, insecure = false): client.Configuration => {
    const made = new client.Configuration({ issuer: 'https://idp.example.com', ...(endpoint === undefined ? {} : { end_session_endpoint: endpoint }) }, 'patient-web', 'client-secret')
    if (insecure) client.allowInsecureRequests(made)
    return made
  }
  const passed = endSessionUrlOf(configuration('https://idp.example.com/logout'), oidc, 'an-id-token')
  t.ok(passed?.startsWith('https://idp.example.com/logout?'), 'https')
  t.equal(new URL(passed ?? 'about:blank').searchParams.get('id_token_hint'), 'an-id-token')
  t.equal(new URL(passed ?? 'about:blank').searchParams.get('post_logout_redirect_uri'), 'https://app.example.com')
  t.ok(endSessionUrlOf(configuration('http://127.0.0.1:4000/session/end', true), oidc, null)?.startsWith('http://127.0.0.1:4000/session/end?'), 'http where allowed')
  for (const endpoint of ['javascript:alert(document.cookie)', 'data:text/html,<script>alert(1)</script>', 'http://idp.example.com/logout', 'ftp://idp.example.com/logout', 'ftp://127.0.0.1/logout', 'javascript://localhost/%0Aalert(document.cookie)']) {
    t.equal(endSessionUrlOf(configuration(endpoint), oidc, 'an-id-token'), null, endpoint)
    t.equal(endSessionUrlOf(configuration(endpoint, true), oidc, null), null, `${endpoint}, plain http allowed`)
  }
  // Loopback http from an https issuer: passed by the policy, refused by openid-client.
  t.equal(endSessionUrlOf(configuration('http://127.0.0.1:4000/session/end'), oidc, null), null, 'http where not allowed')
  t.equal(endSessionUrlOf(configuration(), oidc, null), null, 'none published')
})
