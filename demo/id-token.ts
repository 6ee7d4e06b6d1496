import { createHash, randomBytes } from 'node:crypto'

/**
 * An ID token for the demo's mobile client, obtained the way a mobile app obtains one: the
 * authorization code flow with PKCE against the development IdP, as a public client. The IdP's
 * one-click sign-in page is "clicked" over plain HTTP (a form POST naming the account). Nothing is
 * forged: the token is the provider's own, signed with its key.
 */

export const MOBILE_CLIENT_ID = 'patient-mobile'
/** RFC 8252 private-use URI scheme redirect of a native app; never visited here, only read. */
export const MOBILE_REDIRECT_URI = 'com.example.patient:/oauth2redirect'

/** The mobile app's registration at the development IdP (oidc-provider client metadata). */
export const MOBILE_CLIENT = {
  client_id: MOBILE_CLIENT_ID,
  client_name: 'Care360 patient app (mobile, demo)',
  application_type: 'native',
  token_endpoint_auth_method: 'none',
  redirect_uris: [MOBILE_REDIRECT_URI],
  grant_types: ['authorization_code'],
  response_types: ['code']
}

export interface MobileIdTokenOptions {
  /** The IdP's issuer URL, e.g. http://127.0.0.1:4000 */
  issuer: string
  /** A demo account's email (one of DEMO_ACCOUNTS). */
  email: string
  clientId?: string
  redirectUri?: string
}

/** A cookie jar for one origin, as much as oidc-provider's interaction cookies need. */
class Jar {
  readonly #cookies = new Map<string, string>()

  header (): Record<string, string> {
    if (this.#cookies.size === 0) return {}
    return { cookie: [...this.#cookies].map(([name, value]) => `${name}=${value}`).join('; ') }
  }

  take (response: Response): void {
    for (const line of response.headers.getSetCookie()) {
      const pair = line.split(';')[0] ?? ''
      const index = pair.indexOf('=')
      const name = pair.slice(0, index).trim()
      const value = pair.slice(index + 1).trim()
      // oidc-provider clears a cookie by an empty value with an expiry in the past.
      if (value === '' || /expires=Thu, 01 Jan 1970/i.test(line)) this.#cookies.delete(name)
      else this.#cookies.set(name, value)
    }
  }
}

function base64url (bytes: Buffer): string {
  return bytes.toString('base64url')
}

export async function mobileIdToken (options: MobileIdTokenOptions): Promise<string> {
  const issuer = options.issuer.replace(/\/+$/, '')
  const clientId = options.clientId ?? MOBILE_CLIENT_ID
  const redirectUri = options.redirectUri ?? MOBILE_REDIRECT_URI
  const jar = new Jar()

  async function request (url: string, init: RequestInit = {}): Promise<Response> {
    const response = await fetch(url, {
      ...init,
      headers: { ...jar.header(), ...(init.headers as Record<string, string> | undefined) },
      redirect: 'manual',
      signal: AbortSignal.timeout(10_000)
    })
    jar.take(response)
    return response
  }

  const discovery = await (await request(`${issuer}/.well-known/openid-configuration`)).json() as { authorization_endpoint: string, token_endpoint: string }
  const verifier = base64url(randomBytes(32))
  const state = base64url(randomBytes(16))
  const authorize = new URL(discovery.authorization_endpoint)
  authorize.search = new URLSearchParams({
    client_id: clientId,
    response_type: 'code',
    redirect_uri: redirectUri,
    scope: 'openid email',
    state,
    nonce: base64url(randomBytes(16)),
    code_challenge: base64url(createHash('sha256').update(verifier).digest()),
    code_challenge_method: 'S256'
  }).toString()

  // Follow redirects by hand until the IdP sends the browser back to the app with a code.
  let url = authorize.href
  let response = await request(url)
  for (let hops = 0; hops < 10; hops++) {
    if (response.status >= 300 && response.status < 400) {
      const location = response.headers.get('location') ?? ''
      if (location.startsWith(redirectUri)) {
        const answer = new URL(location).searchParams
        if (answer.get('state') !== state) throw new Error('the IdP answered another sign-in (state mismatch)')
        const code = answer.get('code')
        if (code === null) throw new Error(`the IdP refused the sign-in: ${answer.get('error') ?? 'no code'}`)
        return await exchange(discovery.token_endpoint, code)
      }
      await response.arrayBuffer()
      url = new URL(location, url).href
      response = await request(url)
      continue
    }
    const page = await response.text()
    if (response.status !== 200 || !new URL(url).pathname.startsWith('/interaction/')) {
      throw new Error(`unexpected answer from the IdP at ${url}: ${response.status}`)
    }
    if (!page.includes(`value="${options.email}"`)) throw new Error(`${options.email} is not a demo account of this IdP`)
    // The one-click sign-in page: choose the account.
    response = await request(url, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({ account: options.email }).toString()
    })
  }
  throw new Error('too many redirects at the IdP')

  async function exchange (tokenEndpoint: string, code: string): Promise<string> {
    const answer = await request(tokenEndpoint, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({ grant_type: 'authorization_code', code, redirect_uri: redirectUri, client_id: clientId, code_verifier: verifier }).toString()
    })
    const tokens = await answer.json() as { id_token?: string, error?: string }
    if (tokens.id_token === undefined) throw new Error(`the token endpoint refused the code: ${tokens.error ?? answer.status}`)
    return tokens.id_token
  }
}
