import { rememberSecret } from '../helpers/secrets.js'

/**
 * A browser as far as sign-in needs one: a cookie jar and redirects followed by hand
 * (`redirect: 'manual'`), so that a test sees every hop. Cookies are kept per origin and sent over
 * plain http to loopback, as browsers do for localhost, `__Host-` and Secure ones included.
 */

export interface Page {
  status: number
  url: string
  headers: Headers
  text: string
  /** Every URL visited, the first request included. */
  chain: string[]
}

export interface RequestInit {
  method?: string
  headers?: Record<string, string>
  form?: Record<string, string>
  json?: unknown
}

export class Browser {
  readonly jar = new Map<string, Map<string, string>>()
  /** Every Set-Cookie line received, with the URL that sent it (tests check the attributes). */
  readonly received: Array<{ url: string, line: string }> = []

  cookie (url: string, name: string): string | undefined {
    return this.jar.get(new URL(url).origin)?.get(name)
  }

  /** The names of the cookies held for `url`'s origin that begin with `prefix`. */
  cookieNames (url: string, prefix: string): string[] {
    return [...(this.jar.get(new URL(url).origin)?.keys() ?? [])].filter((name) => name.startsWith(prefix))
  }

  setCookie (url: string, name: string, value: string): void {
    const origin = new URL(url).origin
    const cookies = this.jar.get(origin) ?? new Map<string, string>()
    cookies.set(name, value)
    this.jar.set(origin, cookies)
  }

  /** One request, no redirect followed. */
  async fetch (url: string, init: RequestInit = {}): Promise<Response> {
    const origin = new URL(url).origin
    const headers: Record<string, string> = { ...init.headers }
    const cookies = this.jar.get(origin)
    if (cookies !== undefined && cookies.size > 0) {
      headers.cookie = [...cookies].map(([name, value]) => `${name}=${value}`).join('; ')
    }
    let body: string | undefined
    if (init.form !== undefined) {
      headers['content-type'] = 'application/x-www-form-urlencoded'
      body = new URLSearchParams(init.form).toString()
    } else if (init.json !== undefined) {
      headers['content-type'] = 'application/json'
      body = JSON.stringify(init.json)
    }
    const response = await fetch(url, { method: init.method ?? 'GET', headers, body, redirect: 'manual', signal: AbortSignal.timeout(10_000) })
    const lines = response.headers.getSetCookie()
    for (const line of lines) this.received.push({ url, line })
    // For the suite-wide log scan: what the browser holds and what the IdP sends it back with.
    for (const line of lines) rememberSecret('cookie', line.split(';')[0]?.split('=').slice(1).join('='))
    const { searchParams } = new URL(url)
    rememberSecret('authorization code', searchParams.get('code'))
    rememberSecret('state', searchParams.get('state'))
    this.#store(origin, lines)
    return response
  }

  /** A navigation: follows redirects (GET after 302/303) until a page. */
  async navigate (url: string, init: RequestInit = {}): Promise<Page> {
    const chain = [url]
    let response = await this.fetch(url, init)
    let current = url
    while (response.status >= 300 && response.status < 400 && response.headers.has('location')) {
      if (chain.length > 20) throw new Error('too many redirects')
      await response.arrayBuffer()
      current = new URL(response.headers.get('location') as string, current).href
      chain.push(current)
      response = await this.fetch(current)
    }
    return { status: response.status, url: current, headers: response.headers, text: await response.text(), chain }
  }

  #store (origin: string, setCookies: string[]): void {
    const cookies = this.jar.get(origin) ?? new Map<string, string>()
    for (const line of setCookies) {
      const [pair = '', ...attributes] = line.split(';').map((part) => part.trim())
      const index = pair.indexOf('=')
      const name = pair.slice(0, index)
      const value = pair.slice(index + 1)
      const expired = attributes.some((attribute) => {
        const [key = '', val = ''] = attribute.split('=')
        if (key.toLowerCase() === 'max-age') return Number(val) <= 0
        if (key.toLowerCase() === 'expires') return Date.parse(val) <= Date.now()
        return false
      })
      if (expired || value === '') cookies.delete(name)
      else cookies.set(name, value)
    }
    this.jar.set(origin, cookies)
  }
}
