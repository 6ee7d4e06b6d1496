import t, { type Test } from 'tap'
import fc from 'fast-check'
import { signIn } from '../helpers/app.js'
import { BODY_LIMIT_BYTES } from '../../src/app.js'
import { SANDBOX_KEY } from '../helpers/sandbox.js'
import { DEMO_PATIENTS } from '../../src/care360/sandbox.js'
import { SESSION_COOKIE } from '../../src/auth/cookie.js'
import { captureLogs, offContract, outcome, REQUEST_ID, scanLogs, startSandboxedApp } from '../fault/support.js'

/**
 * Property-based abuse of every public route (enumerated from the app itself), with a valid
 * session and without: random paths, headers and bodies. The oracle, for every request:
 * - the answer is a row of the contract's table (envelope, code of its status, x-request-id,
 *   cache-control), and never a 5xx: the upstream behaves here, so only our bugs could make one;
 * - x-request-id is the caller's exactly when it is well-formed;
 * - no upstream call unless the request is a valid list or cancel of a session (`mayCallUpstream`).
 * The cancel route and sign-in get exact oracles of their own below.
 */

const alice = DEMO_PATIENTS[0]!
const bob = DEMO_PATIENTS[1]!
const owned = alice.appointments[0]!
const UUID = /^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$/
// FUZZ_RUNS raises the runs; anything that is not a positive number (empty, 0) keeps 150, so that
// no setting turns the properties into checks of zero runs.
const RUNS = Number(process.env.FUZZ_RUNS) > 0 ? Number(process.env.FUZZ_RUNS) : 150
const METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'] as const
type Method = typeof METHODS[number]

const { lines, stream } = captureLogs()
const reasons: string[] = []

interface Route { method: string, url: string }

/**
 * Every route the app registered, from its own route tree (`printRoutes`): the routes are added
 * inside buildApp, before a test could attach an onRoute hook, so the tree is the app's own list.
 */
function routesOf (tree: string): Route[] {
  const routes: Route[] = []
  const stack: string[] = []
  for (const line of tree.split('\n')) {
    const match = /^([\s│├└─]*)(\S.*?)(?: \(([^)]*)\))?$/.exec(line.replace(/\s+$/, ''))
    if (match === null) continue
    const depth = Math.floor((match[1] ?? '').length / 4)
    stack.length = depth
    stack.push(match[2] as string)
    const url = stack.join('')
    for (const method of (match[3] ?? '').split(',').map((item) => item.trim()).filter(Boolean)) routes.push({ method, url })
  }
  return routes
}

t.test('abuse of every public route', async (t) => {
  const { app, issuer, sandbox, token } = await startSandboxedApp(t, {
    upstreamTimeoutMs: 2000,
    email: alice.email,
    logStream: stream,
    // The suite-wide scan still looks for the key, the sessions and their emails in these lines;
    // the fuzzed text (which a logged path may hold by chance) is this file's own scan's.
    scanRequests: false,
    env: {
      OIDC_CLIENT_SECRET: 'fuzz-client-secret-value',
      PUBLIC_URL: 'https://patient.example',
      CORS_ORIGINS: 'https://app.example'
    }
  })
  // A cookie session is made in the store directly: the web sign-in needs a browser and an IdP.
  const webSession = async () => (await app.sessions.create({ email: alice.email, subject: 'sub-alice-web', issuer: issuer.url, method: 'web', idpSessionId: null })).token
  let bearer = token
  let cookieToken = await webSession()
  const everyToken = [bearer, cookieToken]
  /** A fuzzed sign-out that worked ended one of our sessions: make new ones for later runs. */
  async function renewSessions (): Promise<void> {
    bearer = await signIn(app, issuer, alice.email)
    cookieToken = await webSession()
    everyToken.push(bearer, cookieToken)
  }

  const routes = routesOf(app.printRoutes({ commonPrefix: false }))
  const templates = [...new Set(routes.map((route) => route.url))]
  t.same(templates.filter((url) => !url.startsWith('/') && url !== '*'), [], 'every route has a path')
  for (const url of ['/appointments', '/appointments/:id/cancel', '/auth/session', '/auth/me', '/auth/logout', '/auth/login', '/auth/callback', '/auth/backchannel-logout', '/healthz', '/readyz', '/openapi.json']) {
    t.ok(templates.includes(url), `the route list has ${url}`)
  }
  const openapi = (await app.inject({ url: '/openapi.json' })).json() as { paths: Record<string, unknown> }
  for (const path of Object.keys(openapi.paths)) {
    t.ok(templates.includes(path.replace(/\{(\w+)\}/g, ':$1')), `documented ${path} is a route`)
  }

  // --- the request model ---------------------------------------------------------------------

  type Auth = 'none' | 'bearer' | 'bad-bearer' | 'cookie' | 'cookie+csrf' | 'bad-cookie'
  interface Fuzzed { method: Method, url: string, headers: Record<string, string>, body?: string, auth: Auth }

  function authHeaders (auth: Auth): Record<string, string> {
    switch (auth) {
      case 'bearer': return { authorization: `Bearer ${bearer}` }
      case 'bad-bearer': return { authorization: `Bearer ${bearer.slice(0, -3)}AAA` }
      case 'cookie': return { cookie: `${SESSION_COOKIE}=${cookieToken}` }
      case 'cookie+csrf': return { cookie: `${SESSION_COOKIE}=${cookieToken}`, 'x-csrf': '1' }
      case 'bad-cookie': return { cookie: `${SESSION_COOKIE}=${'B'.repeat(43)}` }
      default: return {}
    }
  }

  const authArb = fc.constantFrom<Auth>('none', 'bearer', 'bad-bearer', 'cookie', 'cookie+csrf', 'bad-cookie')
  const visible = fc.string({ unit: fc.integer({ min: 0x20, max: 0x7e }).map((code) => String.fromCharCode(code)), maxLength: 60 })
  const segment = fc.oneof(
    fc.string({ maxLength: 12 }).map(encodeURIComponent),
    fc.uuid(),
    fc.constantFrom('..', '.', '%2e%2e', '%2F', '%00', '%ff', '%', '%zz', '~', ';x=1', '*', ':id', 'cancel', 'appointments', 'auth', '__proto__', 'x'.repeat(300))
  )
  const queryArb = fc.option(fc.dictionary(fc.string({ maxLength: 8 }), fc.string({ maxLength: 20 }), { maxKeys: 3 }).map((query) => `?${new URLSearchParams(query).toString()}`), { nil: '' })

  /** A path near a real one: the route itself, its template filled with junk, or mutated. */
  const pathArb = fc.tuple(fc.constantFrom(...templates), fc.array(segment, { maxLength: 3 }), fc.nat(5), queryArb).map(([template, junk, how, query]) => {
    const filled = template === '*' ? `/${junk[0] ?? ''}` : template.replace(':id', junk[0] ?? owned.id)
    switch (how) {
      case 0: return `${filled}${query}`
      case 1: return `${filled}/${junk.join('/')}${query}`
      case 2: return `${filled}/${query}`
      case 3: return `/${junk.join('/')}${query}`
      case 4: return `${filled.replace(/^\//, '//')}${query}`
      default: return `${filled.toUpperCase()}${query}`
    }
  })

  const headerNames = ['authorization', 'cookie', 'x-request-id', 'origin', 'x-csrf', 'sec-fetch-site', 'content-type', 'accept', 'accept-encoding',
    'x-forwarded-for', 'x-forwarded-proto', 'x-forwarded-host', 'idempotency-key', 'if-none-match', 'range', 'access-control-request-method',
    'access-control-request-headers', 'x-http-method-override', 'cv-api-key', 'transfer-encoding-x', 'user-agent', 'referer']
  const headerValue = fc.oneof(
    visible,
    fc.constantFrom('Bearer', 'Bearer ', 'bearer x y', `Bearer ${'A'.repeat(43)}`, `${SESSION_COOKIE}=`, `${SESSION_COOKIE}=x; ${SESSION_COOKIE}=y`, '1', '0', 'cross-site',
      'same-origin', 'https://app.example', 'https://evil.example', 'null', 'application/json', 'text/plain', 'multipart/form-data; boundary=x',
      '127.0.0.1, 10.0.0.1', 'DELETE', 'x'.repeat(200))
  )
  const headersArb = fc.dictionary(fc.constantFrom(...headerNames), headerValue, { maxKeys: 5 })

  const bodyArb = fc.option(fc.oneof(
    fc.string({ maxLength: 40 }),
    fc.jsonValue({ maxDepth: 3 }).map((value) => JSON.stringify(value)),
    fc.record({ reason: fc.string({ maxLength: 30 }) }).map((value) => JSON.stringify(value)),
    fc.record({ idToken: fc.string({ maxLength: 60 }) }).map((value) => JSON.stringify(value)),
    fc.string({ maxLength: 60 }).map((token) => `logout_token=${encodeURIComponent(token)}`)
  ), { nil: undefined })
  const contentTypeArb = fc.constantFrom('application/json', 'application/json; charset=utf-8', 'text/plain', 'application/x-www-form-urlencoded', 'application/xml', 'multipart/form-data; boundary=x')

  const requestArb = fc.record({
    method: fc.constantFrom(...METHODS),
    url: pathArb,
    headers: headersArb,
    body: bodyArb,
    contentType: contentTypeArb,
    auth: authArb
  }).map(({ method, url, headers, body, contentType, auth }): Fuzzed => {
    const all: Record<string, string> = { ...headers, ...authHeaders(auth) }
    if (body !== undefined) all['content-type'] = headers['content-type'] ?? contentType
    return { method, url, headers: all, auth, ...(body === undefined ? {} : { body }) }
  })

  // --- the oracle ----------------------------------------------------------------------------

  const hasSession = (request: Fuzzed): boolean => request.auth === 'bearer' || request.auth === 'cookie' || request.auth === 'cookie+csrf'

  /** Whether the upstream may be called: a session's list, or its cancel of a UUID with a valid body. */
  function mayCallUpstream (request: Fuzzed): boolean {
    if (!hasSession(request)) return false
    const path = request.url.split('?')[0] as string
    if ((request.method === 'GET' || request.method === 'HEAD') && path === '/appointments') return true
    const cancel = /^\/appointments\/([^/]+)\/cancel$/.exec(path)
    return request.method === 'POST' && cancel !== null && UUID.test(decodeURIComponent(cancel[1] as string))
  }

  function judge (request: Fuzzed, status: number, headers: Record<string, unknown>, body: string, upstreamCalls: number): string | null {
    const label = `${request.method} ${request.url.slice(0, 80)} (${request.auth})`
    if (status >= 500) return `${label}: ${status} ${body.slice(0, 120)}`
    const answer = { status, headers: headers as Record<string, string>, body }
    // HEAD answers have no body; a preflight's 204 has none either.
    // The OpenAPI document is the one success that is not in the envelope.
    if (status === 200 && request.method === 'GET' && request.url.split('?')[0] === '/openapi.json') return null
    const why = request.method === 'HEAD' ? (typeof headers['x-request-id'] === 'string' ? null : 'HEAD without x-request-id') : offContract(answer, request.method === 'OPTIONS' ? [204] : [])
    if (why !== null) return `${label}: ${why}`
    const given = request.headers['x-request-id']
    if (given !== undefined && REQUEST_ID.test(given) && headers['x-request-id'] !== given) return `${label}: x-request-id ${String(headers['x-request-id'])} is not the caller's ${given}`
    if (given !== undefined && !REQUEST_ID.test(given) && headers['x-request-id'] === given) return `${label}: a malformed x-request-id was echoed`
    if (upstreamCalls > 0 && !mayCallUpstream(request)) return `${label}: ${upstreamCalls} upstream call(s) for ${status}`
    if (status === 201 || status === 200) {
      // Success on a state-changing route needs the right credentials.
      const path = request.url.split('?')[0]
      if (path === '/auth/session' && request.method === 'POST') return `${label}: a session from a fuzzed ID token`
      if (path === '/auth/backchannel-logout') return `${label}: a fuzzed logout token was accepted`
      // The fuzzed headers may add `X-CSRF: 1` themselves: such a request is not one without it.
      if (request.method === 'POST' && request.auth === 'cookie' && request.headers['x-csrf'] !== '1') return `${label}: a cookie session without X-CSRF changed state`
    }
    return null
  }

  async function send (request: Fuzzed): Promise<string | null> {
    const before = sandbox.control.calls.length
    const response = await app.inject({
      method: request.method,
      url: request.url,
      headers: request.headers,
      ...(request.body === undefined ? {} : { payload: request.body })
    })
    const verdict = judge(request, response.statusCode, response.headers, response.body, sandbox.control.calls.length - before)
    // A cancel that went through is undone, so that later runs find the same appointments.
    if (sandbox.control.calls.some((entry) => entry.method === 'POST')) sandbox.control.reset()
    if (request.url.split('?')[0] === '/auth/logout' && response.statusCode === 200) await renewSessions()
    if (response.headers['set-cookie'] !== undefined && String(response.headers['set-cookie']).includes(`${SESSION_COOKIE}=`) && !String(response.headers['set-cookie']).includes(`${SESSION_COOKIE}=;`)) {
      return `${request.method} ${request.url}: a session cookie was set`
    }
    return verdict
  }

  async function holds (t: Test, name: string, arb: fc.Arbitrary<Fuzzed>): Promise<void> {
    const failures: string[] = []
    await fc.assert(fc.asyncProperty(arb, async (request) => {
      const why = await send(request)
      if (why !== null) failures.push(why)
      return why === null
    }), { numRuns: RUNS, endOnFailure: true }).catch((error: Error) => { if (failures.length === 0) failures.push(error.message.slice(0, 400)) })
    t.same(failures.slice(0, 3), [], name)
  }

  // --- the properties ------------------------------------------------------------------------

  await t.test('random paths near every route, every method', async (t) => {
    await holds(t, 'paths', requestArb.map(({ method, url, auth }): Fuzzed => ({ method, url, auth, headers: authHeaders(auth) })))
  })

  await t.test('random headers on every route, with and without a session', async (t) => {
    await holds(t, 'headers', fc.tuple(fc.constantFrom(...routes.filter((route) => route.url !== '*')), headersArb, authArb).map(([route, headers, auth]): Fuzzed => ({
      method: route.method as Method,
      url: route.url.replace(':id', owned.id),
      headers: { ...headers, ...authHeaders(auth) },
      auth
    })))
  })

  await t.test('random bodies and content types to every route', async (t) => {
    await holds(t, 'bodies', fc.tuple(fc.constantFrom(...routes.filter((route) => route.url !== '*')), bodyArb, contentTypeArb, authArb, fc.boolean()).map(([route, body, contentType, auth, bobs]): Fuzzed => ({
      method: route.method as Method,
      url: route.url.replace(':id', bobs ? bob.appointments[0]!.id : owned.id),
      headers: { ...(body === undefined ? {} : { 'content-type': contentType }), ...authHeaders(auth) },
      auth,
      ...(body === undefined ? {} : { body })
    })))
  })

  await t.test('everything at once', async (t) => {
    await holds(t, 'anything', requestArb)
  })

  // --- the cancel route's exact oracle -------------------------------------------------------

  await t.test('cancel: random ids, bodies and keys get exactly the answer the contract says', async (t) => {
    const controls = fc.constantFrom('\u0000', '\u0007', '\u000b', '\u000c', '\u001b', '\u007f', '\u0085', '\u009f')
    const allowedWhitespace = fc.constantFrom('\t', '\n', '\r')
    const reasonArb = fc.oneof(
      fc.string({ maxLength: 40 }),
      fc.string({ unit: 'binary', maxLength: 40 }),
      fc.string({ unit: 'grapheme', minLength: 480, maxLength: 520 }),
      fc.tuple(fc.string({ maxLength: 10 }), fc.oneof(controls, allowedWhitespace), fc.string({ maxLength: 10 })).map((parts) => parts.join('')),
      fc.integer({ min: 495, max: 505 }).map((n) => '😀'.repeat(n))
    )
    const bodyModel = fc.oneof(
      fc.constant({ kind: 'none' as const }),
      fc.constantFrom('', '  ', '\n').map((text) => ({ kind: 'raw' as const, text })),
      fc.string({ maxLength: 30 }).map((text) => ({ kind: 'raw' as const, text })),
      fc.jsonValue({ maxDepth: 2 }).map((value) => ({ kind: 'raw' as const, text: JSON.stringify(value) })),
      reasonArb.map((reason) => ({ kind: 'raw' as const, text: JSON.stringify({ reason }) })),
      fc.jsonValue({ maxDepth: 1 }).map((reason) => ({ kind: 'raw' as const, text: JSON.stringify({ reason }) })),
      fc.tuple(reasonArb, fc.string({ minLength: 1, maxLength: 10 }).filter((key) => key !== 'reason'), fc.jsonValue({ maxDepth: 1 })).map(([reason, key, value]) => ({ kind: 'raw' as const, text: `{"reason":${JSON.stringify(reason)},${JSON.stringify(key)}:${JSON.stringify(value) ?? 'null'}}` })),
      fc.constantFrom('{"__proto__":{"x":1}}', '{"constructor":{"prototype":{"x":1}}}', '{"reason":"a","reason":"b"}', '{"reason":"x"}garbage', `{"reason":"${'x'.repeat(5000)}"}`).map((text) => ({ kind: 'raw' as const, text }))
    )
    const idArb = fc.oneof(
      { weight: 4, arbitrary: fc.constantFrom(owned.id, owned.agentEventId, alice.appointments[1]!.id) },
      fc.constantFrom(owned.id, owned.agentEventId, owned.id.toUpperCase(), bob.appointments[0]!.id, `${owned.id}0`, owned.id.slice(1), owned.id.replace(/-/g, '')),
      fc.uuid(),
      fc.string({ maxLength: 40 })
    )
    const keyArb = fc.option(fc.oneof(visible.filter((key) => key.length > 0 && !key.includes(' ')).map((key) => ({ key, unique: true })), fc.constantFrom('', 'has space', 'k'.repeat(256), 'é').map((key) => ({ key, unique: false }))), { nil: undefined })
    const contentType = fc.oneof(
      { weight: 6, arbitrary: fc.constantFrom('application/json', 'application/json; charset=utf-8') },
      { weight: 1, arbitrary: fc.constantFrom('text/plain', 'application/x-www-form-urlencoded') }
    )
    let serial = 0
    const seen = new Map<string, number>()

    function validReason (reason: unknown): boolean {
      return typeof reason === 'string' && [...reason].length <= 500 && !/[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f]/.test(reason) // eslint-disable-line no-control-regex
    }

    /** The contract's answer to this cancel, from its own rules (steps 1 to 6). */
    function expected (id: string, body: { kind: 'none' } | { kind: 'raw', text: string }, type: string, key: string | undefined): string {
      // No route at all, whatever the body: the URL parser removes a dot segment
      // (`/appointments/./cancel` is `/appointments/cancel`).
      if (id === '.' || id === '..') return '404 NOT_FOUND'
      if (body.kind === 'raw') {
        // An empty body is no body, whatever type it was sent as.
        if (!type.startsWith('application/json') && body.text !== '') return '415 UNSUPPORTED_MEDIA_TYPE'
        if (Buffer.byteLength(body.text) > BODY_LIMIT_BYTES) return '413 PAYLOAD_TOO_LARGE'
      }
      if (!UUID.test(id)) return '400 VALIDATION_FAILED'
      let reason: unknown
      if (body.kind === 'raw' && body.text.trim() !== '') {
        let value: unknown
        try { value = JSON.parse(body.text) } catch { return '400 VALIDATION_FAILED' }
        if (typeof value !== 'object' || value === null || Array.isArray(value)) return '400 VALIDATION_FAILED'
        if (Object.keys(value).some((name) => name !== 'reason')) return '400 VALIDATION_FAILED'
        if ('reason' in value) {
          reason = (value as { reason: unknown }).reason
          if (!validReason(reason)) return '400 VALIDATION_FAILED'
        }
      }
      if (key !== undefined && !/^[\x21-\x7e]{1,255}$/.test(key)) return '400 VALIDATION_FAILED'
      const mine = alice.appointments.some((item) => item.id === id.toLowerCase() || item.agentEventId === id.toLowerCase())
      return mine ? '200 -' : '404 APPOINTMENT_NOT_FOUND'
    }

    const failures: string[] = []
    await fc.assert(fc.asyncProperty(idArb, bodyModel, contentType, keyArb, async (id, body, type, keyModel) => {
      const key = keyModel === undefined ? undefined : keyModel.unique ? `${keyModel.key}-${++serial}` : keyModel.key
      const headers: Record<string, string> = { authorization: `Bearer ${bearer}` }
      if (body.kind === 'raw') headers['content-type'] = type
      if (key !== undefined) headers['idempotency-key'] = key
      if (body.kind === 'raw') {
        const match = /"reason":("(?:[^"\\]|\\.)*")/.exec(body.text)
        if (match !== null) reasons.push(JSON.parse(match[1] as string) as string)
      }
      sandbox.control.reset()
      const response = await app.inject({ method: 'POST', url: `/appointments/${encodeURIComponent(id)}/cancel`, headers, ...(body.kind === 'raw' ? { payload: body.text } : {}) })
      const want = expected(id, body, type, key)
      const got = outcome({ status: response.statusCode, body: response.body })
      seen.set(got, (seen.get(got) ?? 0) + 1)
      const posts = sandbox.control.calls.filter((entry) => entry.method === 'POST')
      let why: string | null = null
      if (got !== want && !(want === '400 VALIDATION_FAILED' && got === '404 NOT_FOUND' && !UUID.test(id))) why = `${want} wanted, ${got} got: ${response.body.slice(0, 160)}`
      else if (offContract({ status: response.statusCode, headers: response.headers as Record<string, string>, body: response.body }) !== null) why = offContract({ status: response.statusCode, headers: response.headers as Record<string, string>, body: response.body })
      else if (want !== '200 -' && posts.length > 0) why = `a cancel was sent for ${want}`
      else if (!want.startsWith('200') && !want.startsWith('404') && sandbox.control.calls.length > 0) why = `${sandbox.control.calls.length} upstream call(s) for ${want}`
      else if (want === '200 -') {
        const sent = posts[0]?.body as Record<string, unknown> | undefined
        const parsed = body.kind === 'raw' && body.text.trim() !== '' ? JSON.parse(body.text) as { reason?: string } : {}
        // The id as the upstream lists it, whatever its case in the path.
        const listed = [owned.id, owned.agentEventId, alice.appointments[1]!.id].find((known) => known?.toLowerCase() === id.toLowerCase()) ?? id
        const wanted = { email: alice.email, appointmentId: listed, ...(parsed.reason === undefined ? {} : { reason: parsed.reason }) }
        // None when an identical cancel a moment earlier shares its answer (single flight).
        if (posts.length > 1 || (posts.length === 1 && JSON.stringify(sent) !== JSON.stringify(wanted))) why = `the cancel sent was ${JSON.stringify(sent)?.slice(0, 120)}`
      }
      if (why !== null) failures.push(`POST /appointments/${id.slice(0, 40)}/cancel ${body.kind === 'raw' ? JSON.stringify(body.text.slice(0, 60)) : '(no body)'} ${type} key=${String(key).slice(0, 20)}: ${why}`)
      return why === null
    }), {
      numRuns: RUNS * 2,
      endOnFailure: true,
      // Found by a CI run: a dot segment is no route, whatever the body says.
      examples: [['.', { kind: 'raw', text: '{}' }, 'text/plain', undefined], ['..', { kind: 'none' }, 'application/json', undefined]]
    }).catch((error: Error) => { if (failures.length === 0) failures.push(error.message.slice(0, 400)) })
    t.same(failures.slice(0, 3), [], 'every cancel answered as the contract says, upstream called only for a valid owned one')
    t.comment(`outcomes: ${JSON.stringify(Object.fromEntries(seen))}`)
    for (const kind of ['200 -', '404 APPOINTMENT_NOT_FOUND', '400 VALIDATION_FAILED', '415 UNSUPPORTED_MEDIA_TYPE']) t.ok(seen.has(kind), `the runs reached ${kind}`)
  })

  await t.test('sign-in: random bodies and ID tokens never make a session', async (t) => {
    // The cancel property's last run may have left its own upstream calls on record.
    sandbox.control.reset()
    const header = (fields: Record<string, unknown>) => Buffer.from(JSON.stringify(fields)).toString('base64url')
    const jwtish = fc.tuple(
      fc.constantFrom({ alg: 'none' }, { alg: 'HS256' }, { alg: 'RS256', kid: 'nope' }, { alg: 'RS256' }, { alg: 'ES256', kid: '../../etc/passwd' }, {}),
      fc.dictionary(fc.constantFrom('iss', 'aud', 'email', 'email_verified', 'exp', 'iat', 'sub'), fc.jsonValue({ maxDepth: 1 }), { maxKeys: 7 }),
      fc.string({ maxLength: 40 })
    ).map(([h, claims, signature]) => `${header(h)}.${header(claims)}.${Buffer.from(signature).toString('base64url')}`)
    const idToken = fc.oneof(jwtish, fc.string({ maxLength: 100 }), fc.jsonValue({ maxDepth: 1 }))
    const failures: string[] = []
    await fc.assert(fc.asyncProperty(fc.oneof(
      idToken.map((value) => JSON.stringify({ idToken: value })),
      fc.tuple(idToken, fc.string({ minLength: 1, maxLength: 8 })).map(([value, key]) => JSON.stringify({ idToken: value, [key]: 1 })),
      fc.jsonValue({ maxDepth: 2 }).map((value) => JSON.stringify(value)),
      fc.string({ maxLength: 50 })
    ), async (payload) => {
      const response = await app.inject({ method: 'POST', url: '/auth/session', headers: { 'content-type': 'application/json' }, payload })
      const got = outcome({ status: response.statusCode, body: response.body })
      const why = !['401 SESSION_REQUIRED', '400 VALIDATION_FAILED'].includes(got)
        ? `${JSON.stringify(payload).slice(0, 100)}: ${got}`
        : offContract({ status: response.statusCode, headers: response.headers as Record<string, string>, body: response.body })
      if (why !== null) failures.push(why)
      return why === null
    }), { numRuns: RUNS, endOnFailure: true }).catch((error: Error) => { if (failures.length === 0) failures.push(error.message.slice(0, 400)) })
    t.same(failures.slice(0, 3), [], 'only 401 SESSION_REQUIRED or 400 VALIDATION_FAILED')
    t.equal(sandbox.control.calls.length, 0, 'sign-in never calls the upstream')
  })

  await t.test('an owned appointment named in upper case is cancelled, forwarded as the upstream lists it', async (t) => {
    sandbox.control.reset()
    // A reason no property sent: an identical cancel a moment earlier would share its answer.
    reasons.push('upper-case id check')
    const response = await app.inject({
      method: 'POST',
      url: `/appointments/${owned.id.toUpperCase()}/cancel`,
      headers: { authorization: `Bearer ${bearer}`, 'content-type': 'application/json' },
      payload: { reason: 'upper-case id check' }
    })
    t.equal(outcome({ status: response.statusCode, body: response.body }), '200 -')
    const sent = sandbox.control.calls.filter((entry) => entry.method === 'POST').map((entry) => (entry.body as { appointmentId?: string }).appointmentId)
    t.same(sent, [owned.id], 'the listed spelling')
    sandbox.control.reset()
  })

  await t.test('an OPTIONS request that is no CORS preflight is answered without leaving the contract', async (t) => {
    const response = await app.inject({ method: 'OPTIONS', url: '/appointments' })
    t.equal(offContract({ status: response.statusCode, headers: response.headers as Record<string, string>, body: response.body }, [204]), null, 'envelope')
  })

  await t.test('no log line carries the key, a token, a cookie, an email or a reason', async (t) => {
    scanLogs(t, lines, {
      'API key': SANDBOX_KEY,
      'session token or cookie': everyToken,
      'web client secret': 'fuzz-client-secret-value',
      email: [alice.email, bob.email],
      'cancellation reason': reasons.filter((reason) => reason.trim().length >= 8 && !/^[\s\w-]{0,12}$/.test(reason))
    })
  })
})
