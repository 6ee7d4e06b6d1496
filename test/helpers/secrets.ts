/**
 * The suite-wide log scan (issue 7: "a scan of every log line written during the whole test run
 * for the API key, tokens, cookies, emails and reasons used in the tests, which must find none").
 *
 * Every app a test builds with `buildTestApp` logs into a capture (at debug unless the test sets
 * LOG_LEVEL; tee'd to the test's own stream when it gives one), and when the app closes its lines
 * are searched for every secret this test process has handed out so far. The helpers that hand
 * them out remember them here: the organization key and web client secret of each config, every
 * ID token the test issuers sign and every logout token the web stack's IdP signs, every session
 * token and its patient's email and web ID token (as the session store makes them), every bearer
 * token, cookie and cancellation reason a test sends through `app.inject`, and the web flow's
 * login-state cookies, authorization codes and states (test/web/browser.ts). A find fails the
 * test that built the app, naming the kind of secret and the log line's message, never the value.
 *
 * Beside the values, the lines' shape: a field named like a secret (reason, email, token, ID
 * token, authorization, cookie) holds nothing but the censor's mark.
 */

/** Shorter values could occur in a log line by chance (a reason "ok", a cookie "x"). */
const MIN_LENGTH = 8

const known = new Map<string, string>()

/** Remembers a secret a test handed out, by kind (for the report); values too short to find are skipped. */
export function rememberSecret (kind: string, value: unknown): void {
  if (typeof value !== 'string' || value.length < MIN_LENGTH) return
  // A value made of one repeated character ('x'.repeat(5000), 'A'.repeat(43)) says nothing.
  if (/^(.)\1*$/s.test(value)) return
  known.set(value, kind)
}

/** The secrets a request a test sends carries: its bearer token, cookies and JSON reason. */
export function rememberRequestSecrets (options: unknown): void {
  if (typeof options !== 'object' || options === null) return
  const { headers, cookies, payload } = options as { headers?: Record<string, unknown>, cookies?: Record<string, unknown>, payload?: unknown }
  const authorization = headers?.authorization
  if (typeof authorization === 'string') rememberSecret('bearer token', authorization.replace(/^Bearer\s+/i, ''))
  const cookie = headers?.cookie
  if (typeof cookie === 'string') for (const pair of cookie.split(';')) rememberSecret('cookie', pair.split('=').slice(1).join('=').trim())
  for (const value of Object.values(cookies ?? {})) rememberSecret('cookie', value)
  let body = payload
  if (typeof body === 'string') {
    try {
      body = JSON.parse(body)
    } catch {
      return
    }
  }
  if (typeof body === 'object' && body !== null) {
    const { reason, idToken } = body as { reason?: unknown, idToken?: unknown }
    rememberSecret('cancellation reason', reason)
    rememberSecret('ID token', idToken)
  }
}

/** Fields that may appear in a line only censored. */
const SECRET_FIELDS = new Set(['reason', 'email', 'token', 'idToken', 'id_token', 'authorization', 'cookie', 'set-cookie', 'cv-api-key', 'apiKey'])

function uncensoredFields (value: unknown, path: string, found: string[]): void {
  if (typeof value !== 'object' || value === null) return
  for (const [key, inner] of Object.entries(value)) {
    if (SECRET_FIELDS.has(key) && inner !== '[redacted]' && inner !== undefined && inner !== null) found.push(`${path}${key}`)
    uncensoredFields(inner, `${path}${key}.`, found)
  }
}

/**
 * What the lines leak: one description per find (kind of secret, or field, and the line's `msg`),
 * never the secret itself. Empty when clean.
 */
export function leaksIn (lines: readonly string[]): string[] {
  const found: string[] = []
  for (const line of lines) {
    for (const part of line.split('\n')) {
      if (part.trim() === '') continue
      let parsed: { msg?: unknown }
      try {
        parsed = JSON.parse(part) as { msg?: unknown }
      } catch {
        found.push(`a line that is not JSON (${part.length} characters)`)
        continue
      }
      const where = `in a line "${String(parsed.msg ?? '').slice(0, 60)}"`
      const fields: string[] = []
      uncensoredFields(parsed, '', fields)
      for (const field of fields) found.push(`an uncensored ${field} ${where}`)
      // As written and as JSON escapes it (a quote or a non-ASCII character in a reason).
      const text = part.toLowerCase()
      for (const [value, kind] of known) {
        const spellings = [value.toLowerCase(), JSON.stringify(value).slice(1, -1).toLowerCase()]
        if (spellings.some((spelling) => text.includes(spelling))) found.push(`a ${kind} ${where}`)
      }
    }
  }
  return found
}

/** How many secrets the scan looks for now (a check that the registry is fed at all). */
export function secretsKnown (): number {
  return known.size
}
