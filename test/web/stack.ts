import { randomUUID } from 'node:crypto'
import { LOGIN_COOKIE_PREFIX, loginCookieName } from '../../src/web/cookies.js'
import { SignJWT, importJWK, type JWK } from 'jose'
import { buildTestApp, type TestApp } from '../helpers/app.js'
import { startTestIdp, type DevIdp } from '../helpers/idp.js'
import type { DevAccount } from '../../src/web/dev-idp.js'
import { rememberSecret } from '../helpers/secrets.js'
import type { RedisServer } from '../helpers/redis.js'
import { SANDBOX_KEY, startSandbox, type RunningSandbox } from '../helpers/sandbox.js'
import { Browser, type Page } from './browser.js'
import { freePort } from '../helpers/ports.js'

/**
 * The web sign-in stack of one test: the service listening on a real loopback port (PUBLIC_URL
 * points at it, so the IdP redirects a browser back to it), the development OpenID Provider, and,
 * when asked, the Care360 sandbox and a Redis.
 */

interface TeardownHost { teardown: (fn: () => unknown) => void }

export interface WebStackOptions {
  redis?: boolean | RedisServer
  sandbox?: boolean
  env?: Record<string, string>
  /** The IdP without an end_session_endpoint. */
  noEndSession?: boolean
  /** The IdP sends no `sid`. */
  noSid?: boolean
  /** The IdP's accounts, instead of the demo's. */
  accounts?: readonly DevAccount[]
}

export interface WebStack extends TestApp {
  idp: DevIdp
  publicUrl: string
  sandbox?: RunningSandbox
  env: Record<string, string>
  /** Signs in through the IdP's one-click page; the page the browser lands on. */
  signIn: (browser: Browser, email: string, returnTo?: string) => Promise<Page>
  /** The session cookie of that browser. */
  sessionOf: (browser: Browser) => string | undefined
  /** Follows the sign-in at the IdP up to the callback URL, without visiting it. */
  callbackUrl: (browser: Browser, email: string, returnTo?: string) => Promise<string>
  /** Signs a JWT with the IdP's own key (logout tokens, mobile ID tokens). */
  signAsIdp: (claims: Record<string, unknown>, header?: Record<string, unknown>) => Promise<string>
  /** A mobile session (bearer) for `email`, through POST /auth/session with an IdP-signed ID token. */
  bearerFor: (email: string) => Promise<string>
}

export const SESSION_COOKIE = '__Host-bff-session'
export { LOGIN_COOKIE_PREFIX, loginCookieName }

/** The name of the login cookie of the sign-in a callback URL finishes (its `state`). */
export function loginCookieFor (callbackUrl: string): string {
  return loginCookieName(new URL(callbackUrl).searchParams.get('state') as string)
}

export async function startWebStack (t: TeardownHost, options: WebStackOptions = {}): Promise<WebStack> {
  const port = await freePort()
  const publicUrl = `http://127.0.0.1:${port}`
  const idp = await startTestIdp(t, {
    publicUrl,
    ...(options.noEndSession === true ? { endSession: false } : {}),
    ...(options.noSid === true ? { sid: false } : {}),
    ...(options.accounts === undefined ? {} : { accounts: options.accounts })
  })
  const sandbox = options.sandbox === true ? await startSandbox(t) : undefined
  const env: Record<string, string> = {
    OIDC_ISSUER: idp.url,
    OIDC_CLIENT_ID: idp.clientId,
    OIDC_CLIENT_SECRET: idp.clientSecret,
    PUBLIC_URL: publicUrl,
    ...(sandbox === undefined ? {} : { CV_API_KEY: SANDBOX_KEY }),
    ...options.env
  }
  const built = await buildTestApp(t, {
    env,
    ...(options.redis === undefined ? {} : { redis: options.redis }),
    ...(sandbox === undefined ? {} : { upstreamUrl: sandbox.url })
  })
  await built.app.listen({ host: '127.0.0.1', port })

  async function signIn (browser: Browser, email: string, returnTo = '/'): Promise<Page> {
    const loginPage = await browser.navigate(`${publicUrl}/auth/login?returnTo=${encodeURIComponent(returnTo)}`)
    if (loginPage.status !== 200 || !loginPage.url.startsWith(`${idp.url}/interaction/`)) {
      throw new Error(`no IdP login page: ${loginPage.status} ${loginPage.url}`)
    }
    return await browser.navigate(loginPage.url, { method: 'POST', form: { account: email } })
  }

  /**
   * Signs in at the IdP and stops at the redirect to the callback: its URL. Follows whatever the
   * IdP does (a login page to fill in, or straight on when the browser's IdP session allows it).
   */
  async function callbackUrl (browser: Browser, email: string, returnTo = '/'): Promise<string> {
    let url = `${publicUrl}/auth/login?returnTo=${encodeURIComponent(returnTo)}`
    let init: Parameters<Browser['fetch']>[1] = {}
    for (let hops = 0; hops < 10; hops++) {
      const response = await browser.fetch(url, init)
      init = {}
      const location = response.headers.get('location')
      if (location === null) {
        // The IdP's login page: the form posts back to the same address.
        if (response.status !== 200 || !url.startsWith(`${idp.url}/interaction/`)) break
        init = { method: 'POST', form: { account: email } }
        continue
      }
      url = new URL(location, url).href
      if (url.startsWith(`${publicUrl}/auth/callback`)) return url
    }
    throw new Error(`no callback (last: ${url})`)
  }

  const signingKey = await importJWK(idp.signingKeys[0] as JWK, 'RS256')
  async function signAsIdp (claims: Record<string, unknown>, header: Record<string, unknown> = {}): Promise<string> {
    const iat = Math.floor(Date.now() / 1000)
    const payload: Record<string, unknown> = { iss: idp.url, aud: idp.clientId, iat, exp: iat + 120, jti: randomUUID(), ...claims }
    for (const [name, value] of Object.entries(payload)) if (value === undefined) Reflect.deleteProperty(payload, name)
    const token = await new SignJWT(payload).setProtectedHeader({ alg: 'RS256', kid: idp.signingKeys[0]?.kid as string, ...header }).sign(signingKey)
    rememberSecret('token signed as the IdP', token)
    return token
  }

  async function bearerFor (email: string): Promise<string> {
    const idToken = await signAsIdp({ sub: `mobile-${email}`, email, email_verified: true })
    const response = await built.app.inject({ method: 'POST', url: '/auth/session', payload: { idToken } })
    if (response.statusCode !== 201) throw new Error(`mobile sign-in failed: ${response.body}`)
    return (response.json() as { data: { token: string } }).data.token
  }

  return {
    ...built,
    callbackUrl,
    signAsIdp,
    bearerFor,
    idp,
    publicUrl,
    env,
    ...(sandbox === undefined ? {} : { sandbox }),
    signIn,
    sessionOf: (browser) => browser.cookie(publicUrl, SESSION_COOKIE)
  }
}
