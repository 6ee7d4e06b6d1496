import { channel } from 'node:diagnostics_channel'
import t from 'tap'
import type { FastifyInstance, InjectOptions, RouteOptions } from 'fastify'
import { Validator } from '@seriousme/openapi-schema-validator'
import { buildTestApp, signIn, type TestApp } from './helpers/app.js'
import { SANDBOX_KEY, startSandbox } from './helpers/sandbox.js'
import { BODY_LIMIT_BYTES } from '../src/app.js'
import { ErrorCode } from '../src/errors.js'
import { DEMO_PATIENTS } from '../src/care360/sandbox.js'
import { CORS_EXPOSED_HEADERS } from '../src/web/security.js'

/**
 * The OpenAPI document: valid against the OpenAPI 3.1 schema, and complete. Completeness is checked
 * against the routes the app really registers, collected by an onRoute hook added the moment the
 * Fastify instance is created (Fastify's `fastify.initialization` diagnostics channel), so a route
 * added anywhere, by any plugin, is seen.
 */

interface Operation {
  tags?: string[]
  security?: unknown[]
  parameters?: Array<{ in: string, name: string }>
  requestBody?: { required?: boolean }
  responses: Record<string, { description: string, headers?: Record<string, unknown>, content?: Record<string, { schema: { allOf?: Array<{ $ref?: string, properties?: { code?: { enum?: string[] } } }>, properties?: { code?: { enum?: string[] } } } }> }>
}

interface Document {
  openapi: string
  servers?: Array<{ url: string }>
  components: { securitySchemes: Record<string, Record<string, unknown>>, schemas: Record<string, unknown>, headers?: Record<string, { required?: boolean }> }
  paths: Record<string, Record<string, Operation>>
}

interface Collected { routes: Array<{ method: string, url: string, hidden: boolean }> }

/** Builds the app while recording every route it registers. */
async function buildRecorded (env: Record<string, string>): Promise<TestApp & Collected> {
  const routes: Collected['routes'] = []
  const init = channel('fastify.initialization')
  function watch (message: unknown): void {
    const { fastify } = message as { fastify: FastifyInstance }
    fastify.addHook('onRoute', function recordRoute (route: RouteOptions) {
      for (const method of ([] as string[]).concat(route.method)) {
        routes.push({ method, url: route.url, hidden: (route.schema as { hide?: boolean } | undefined)?.hide === true })
      }
    })
  }
  init.subscribe(watch)
  try {
    const built = await buildTestApp(t, { env })
    return { ...built, routes }
  } finally {
    init.unsubscribe(watch)
  }
}

async function documentOf (app: FastifyInstance): Promise<Document> {
  const response = await app.inject({ method: 'GET', url: '/openapi.json' })
  t.equal(response.statusCode, 200)
  t.match(response.headers['content-type'], /^application\/json/)
  return response.json() as Document
}

const WEB_ENV = { OIDC_CLIENT_SECRET: 'web-client-secret', PUBLIC_URL: 'https://patients.example.com' }

/** The contract's public routes (metrics aside: another port). */
const CONTRACT_ROUTES = [
  ['post', '/appointments/{id}/cancel'], ['get', '/appointments'], ['post', '/auth/session'], ['get', '/auth/login'],
  ['get', '/auth/callback'], ['get', '/auth/me'], ['post', '/auth/logout'], ['get', '/healthz'], ['get', '/readyz'],
  ['get', '/openapi.json']
]

for (const [name, env] of [['web sign-in configured', WEB_ENV], ['mobile only', {}]] as const) {
  t.test(`the document is valid OpenAPI 3.1 and lists every route (${name})`, async (t) => {
    const { app, routes } = await buildRecorded(env)
    const document = await documentOf(app)

    const result = await new Validator().validate(document as never)
    t.same(result.errors ?? [], [], 'no schema errors')
    t.ok(result.valid, 'valid against the OpenAPI schema')
    t.equal(document.openapi, '3.1.0')

    // HEAD routes are Fastify's automatic twins of GET routes; hidden ones are the CORS preflight catch-all.
    const publicRoutes = routes.filter((route) => !route.hidden && route.method !== 'HEAD')
    t.ok(publicRoutes.length >= 8, 'the onRoute hook saw the routes')
    for (const route of publicRoutes) {
      const path = route.url.replace(/:([A-Za-z0-9_]+)/g, '{$1}')
      const operation = document.paths[path]?.[route.method.toLowerCase()]
      t.ok(operation, `${route.method} ${route.url} is documented`)
      t.ok((operation?.tags ?? []).length > 0, `${route.method} ${route.url} is tagged`)
      t.ok(Array.isArray(operation?.security), `${route.method} ${route.url} states its security`)
    }
    // Nothing documented that the app does not serve.
    const served = new Set(publicRoutes.map((route) => `${route.method.toLowerCase()} ${route.url.replace(/:([A-Za-z0-9_]+)/g, '{$1}')}`))
    for (const [path, operations] of Object.entries(document.paths)) {
      for (const method of Object.keys(operations)) t.ok(served.has(`${method} ${path}`), `${method} ${path} is served`)
    }
    for (const [method, path] of CONTRACT_ROUTES) {
      const web = path === '/auth/login' || path === '/auth/callback'
      if (web && name === 'mobile only') {
        t.notOk(document.paths[path], `${path} absent without web sign-in`)
        continue
      }
      t.ok(document.paths[path as string]?.[method as string], `contract route ${method} ${path}`)
    }
    t.notOk(Object.keys(document.paths).some((path) => path.startsWith('/__sandbox') || path.startsWith('/api/v1')), 'no sandbox route')
    // Every error answer of every route names its codes; every route documents its success.
    for (const [path, operations] of Object.entries(document.paths)) {
      for (const [method, operation] of Object.entries(operations)) {
        t.ok(Object.keys(operation.responses).some((status) => Number(status) >= 200 && Number(status) < 400), `${method} ${path} documents its success`)
        for (const [status, answer] of Object.entries(operation.responses)) {
          if (Number(status) < 400) continue
          const schema = answer.content?.['application/json']?.schema
          // Readiness's 503 is a schema of its own (the envelope and the shared state).
          const codes = schema?.allOf?.[1]?.properties?.code?.enum ?? schema?.properties?.code?.enum ?? []
          t.ok(codes.length > 0, `${method} ${path} ${status} lists its codes`)
        }
      }
    }

    t.same(document.components.securitySchemes.bearer, { type: 'http', scheme: 'bearer', description: document.components.securitySchemes.bearer?.description })
    t.match(document.components.securitySchemes.cookie, { type: 'apiKey', in: 'cookie', name: '__Host-bff-session' })
    t.match(document.components.schemas.ErrorEnvelope, { type: 'object', required: ['status', 'success', 'message', 'code'] })
    t.equal(document.components.headers?.RequestId?.required, true, 'x-request-id is declared on every answer, so always sent')
    if (name === 'mobile only') t.notOk(document.servers, 'no server without PUBLIC_URL')
    else t.same(document.servers, [{ url: 'https://patients.example.com' }])
  })
}

t.test('the cancel route describes its errors, codes, headers and security', async (t) => {
  const { app } = await buildRecorded(WEB_ENV)
  const document = await documentOf(app)
  const cancel = document.paths['/appointments/{id}/cancel']?.post as Operation
  t.ok(cancel)
  t.same(cancel.security, [{ bearer: [] }, { cookie: [] }])
  t.equal(cancel.requestBody?.required, false, 'the body is optional')
  const parameters = (cancel.parameters ?? []).map((parameter) => `${parameter.in}:${parameter.name}`)
  t.ok(parameters.includes('path:id'))
  t.ok(parameters.includes('header:idempotency-key'))
  t.ok(parameters.includes('header:x-csrf'))

  const expected: Record<string, string[]> = {
    400: [ErrorCode.VALIDATION_FAILED, ErrorCode.UPSTREAM_REJECTED],
    401: [ErrorCode.SESSION_REQUIRED],
    403: [ErrorCode.CSRF_REJECTED],
    404: [ErrorCode.APPOINTMENT_NOT_FOUND],
    409: [ErrorCode.IDEMPOTENCY_IN_FLIGHT],
    413: [ErrorCode.PAYLOAD_TOO_LARGE],
    415: [ErrorCode.UNSUPPORTED_MEDIA_TYPE],
    422: [ErrorCode.IDEMPOTENCY_MISMATCH],
    429: [ErrorCode.RATE_LIMITED, ErrorCode.UPSTREAM_RATE_LIMITED],
    502: [ErrorCode.UPSTREAM_AUTH_FAILED, ErrorCode.UPSTREAM_ERROR, ErrorCode.UPSTREAM_UNAVAILABLE],
    504: [ErrorCode.UPSTREAM_TIMEOUT]
  }
  t.ok(cancel.responses['200'], '200 documented')
  for (const [status, codes] of Object.entries(expected)) {
    const answer = cancel.responses[status]
    t.ok(answer, `${status} documented`)
    const schema = answer?.content?.['application/json']?.schema
    t.equal(schema?.allOf?.[0]?.$ref, '#/components/schemas/ErrorEnvelope', `${status} uses the shared envelope`)
    const listed = schema?.allOf?.[1]?.properties?.code?.enum ?? []
    for (const code of codes) {
      t.ok(listed.includes(code), `${status} lists ${code}`)
      t.ok(answer?.description.includes(code), `${status} describes ${code}`)
    }
  }
  t.ok(cancel.responses['429']?.headers?.['retry-after'], '429 documents Retry-After')
})

t.test('public routes without a session state no security; optional ones allow both', async (t) => {
  const { app } = await buildRecorded(WEB_ENV)
  const document = await documentOf(app)
  t.same(document.paths['/auth/session']?.post?.security, [])
  t.same(document.paths['/healthz']?.get?.security, [])
  t.same(document.paths['/auth/me']?.get?.security, [{}, { bearer: [] }, { cookie: [] }])
  t.same(document.paths['/auth/logout']?.post?.security, [{ bearer: [] }, { cookie: [] }])
  t.ok(document.paths['/auth/logout']?.post?.responses['401'], 'logout documents 401')
  // Its 401 may carry data (a sign-out whose session had ended): described as such, not as the
  // shared envelope, which allows no other field.
  const ended = document.paths['/auth/logout']?.post?.responses['401']?.content?.['application/json']?.schema as { allOf?: unknown, properties?: Record<string, { properties?: Record<string, unknown> }> } | undefined
  t.equal(ended?.allOf, undefined)
  t.ok(ended?.properties?.data?.properties?.endSessionUrl, 'logout\'s 401 documents data.endSessionUrl')
  t.same(Object.keys(document.paths['/auth/callback']?.get?.responses ?? {}), ['302'], 'the callback fails by redirect only')
})

t.test('sign-in and the list document the errors they really answer, and only those', async (t) => {
  const { app } = await buildRecorded(WEB_ENV)
  const document = await documentOf(app)
  const codesOf = (operation: Operation | undefined, status: string): string[] | undefined =>
    operation?.responses[status]?.content?.['application/json']?.schema?.allOf?.[1]?.properties?.code?.enum
  const signIn = document.paths['/auth/session']?.post as Operation
  t.same(codesOf(signIn, '401'), [ErrorCode.SESSION_REQUIRED], 'an ID token that fails a check')
  t.equal(signIn.responses['403'], undefined, 'never refused by the CSRF check: it acts in no session')
  t.same(codesOf(signIn, '503'), [ErrorCode.SERVICE_UNAVAILABLE], 'the IdP or the store unreachable')
  t.ok(signIn.responses['503']?.headers?.['retry-after'], 'with Retry-After')
  const list = document.paths['/appointments']?.get as Operation
  t.same(codesOf(list, '400'), [ErrorCode.VALIDATION_FAILED, ErrorCode.UPSTREAM_REJECTED], 'a request that could not be parsed; Care360\'s 400 passed on')
  t.same(codesOf(list, '403'), [ErrorCode.CSRF_REJECTED], 'a GET another origin\'s page embedded is refused by the CSRF check')
  // Care360's codes only where Care360 is called.
  t.equal(signIn.requestBody?.required, true, 'its body, with a required idToken, is required (only an all-optional body may be left out)')
  t.same(codesOf(signIn, '400'), [ErrorCode.VALIDATION_FAILED], 'sign-in never passes on a Care360 400')
  t.same(codesOf(signIn, '429'), [ErrorCode.RATE_LIMITED], 'nor spends the org budget')
})

t.test('the errors a route can answer follow its auth mode; the probes are never limited', async (t) => {
  const { app } = await buildRecorded(WEB_ENV)
  const document = await documentOf(app)
  const me = document.paths['/auth/me']?.get as Operation
  t.equal(me.responses['401'], undefined, 'an optional session: a missing or unknown one is no 401')
  t.ok(me.responses['503'], 'but the session store unreachable is a 503')
  t.ok(me.responses['429'], 'limited per IP')
  for (const probe of ['/healthz', '/readyz']) t.equal(document.paths[probe]?.get?.responses['429'], undefined, `${probe} documents no 429`)
})

t.test('the documented Idempotency-Key is the one the cancel takes: 1 to 255 visible ASCII characters', async (t) => {
  const { app, issuer } = await buildRecorded(WEB_ENV)
  const document = await documentOf(app)
  const parameters = (document.paths['/appointments/{id}/cancel']?.post?.parameters ?? []) as Array<{ name: string, schema?: { pattern?: string } }>
  const pattern = new RegExp(parameters.find((parameter) => parameter.name === 'idempotency-key')?.schema?.pattern ?? '')
  const token = await signIn(app, issuer)
  for (const key of ['k'.repeat(255), 'k'.repeat(256), 'with space']) {
    const response = await app.inject({ method: 'POST', url: '/appointments/3f0b5d2e-8a41-4c1e-9f27-1a6d3c8e5b01/cancel', headers: { authorization: `Bearer ${token}`, 'idempotency-key': key } })
    const refusedForKey = response.statusCode === 400 && /Idempotency-Key/i.test(response.json().message as string)
    t.equal(pattern.test(key), !refusedForKey, `a key of ${key.length} characters: documented ${pattern.test(key) ? 'valid' : 'invalid'}, and so taken`)
  }
})

t.test('every state-changing route documents the answers to a body it cannot take', async (t) => {
  const { app, issuer } = await buildRecorded(WEB_ENV)
  const document = await documentOf(app)
  const token = await signIn(app, issuer)
  const bodies: Array<[string, string]> = [
    ['application/json', '{"unfinished'],
    ['text/plain', 'plain text'],
    ['application/json', JSON.stringify({ padding: 'x'.repeat(8192) })]
  ]
  const example = { id: '3f0b5d2e-8a41-4c1e-9f27-1a6d3c8e5b01' }
  for (const [path, operations] of Object.entries(document.paths)) {
    for (const [method, operation] of Object.entries(operations)) {
      if (method !== 'post') continue
      const url = path.replace(/\{(\w+)\}/g, (_, name: 'id') => example[name])
      for (const [type, payload] of bodies) {
        const response = await app.inject({ method: 'POST', url, headers: { authorization: `Bearer ${token}`, 'content-type': type }, payload })
        t.ok(operation.responses[String(response.statusCode)], `POST ${path} with a ${type} body of ${payload.length} bytes: its ${response.statusCode} is documented`)
      }
    }
  }
})

/** Answer headers a client reads (cache-control and the security headers aside). */
const CLIENT_HEADERS = ['x-request-id', 'ratelimit-policy', 'ratelimit', 'retry-after', 'idempotent-replayed', 'location', 'www-authenticate']

t.test('each answer declares the headers the service sends on it, and only those; the ones declared required are always sent', async (t) => {
  const sandbox = await startSandbox(t)
  const { app, issuer } = await buildTestApp(t, {
    upstreamUrl: sandbox.url,
    env: { ...WEB_ENV, CV_API_KEY: SANDBOX_KEY, CV_TIMEOUT_MS: '1000', RATE_LIMIT_IP: '100/1m', RATE_LIMIT_CANCEL: '1000/1m' }
  })
  const document = await documentOf(app)
  const alice = DEMO_PATIENTS[0]!
  const bob = DEMO_PATIENTS[1]!
  const [first, second, third] = alice.appointments.map((appointment) => appointment.id) as [string, string, string]
  const token = await signIn(app, issuer, alice.email)
  const bearer = { authorization: `Bearer ${token}` }

  // The scenario's own checks: silent unless the service stopped answering as this test assumes.
  const expect = (holds: boolean, what: string): void => { if (!holds) t.fail(`scenario: ${what}`) }

  /** Every answer sent, by operation (as the document names it) and status. */
  const sent = new Map<string, Array<Record<string, unknown>>>()
  async function send (operation: string, options: InjectOptions): Promise<{ statusCode: number, headers: Record<string, unknown> }> {
    const response = await app.inject(options)
    const key = `${operation} ${response.statusCode}`
    sent.set(key, [...sent.get(key) ?? [], response.headers])
    return response
  }
  const CANCEL = 'post /appointments/{id}/cancel'
  const cancel = async (id: string, headers: Record<string, string> = {}, payload?: string): Promise<{ statusCode: number, headers: Record<string, unknown> }> =>
    await send(CANCEL, { method: 'POST', url: `/appointments/${id}/cancel`, headers: { ...bearer, ...(payload === undefined ? {} : { 'content-type': 'application/json' }), ...headers }, ...(payload === undefined ? {} : { payload }) })
  const twice = async (id: string, key: string): Promise<void> => {
    const once = await cancel(id, { 'idempotency-key': key })
    const again = await cancel(id, { 'idempotency-key': key })
    expect(again.statusCode === once.statusCode && again.headers['idempotent-replayed'] === 'true', `${key} replayed`)
  }

  for (const url of ['/healthz', '/readyz', '/openapi.json']) await send(`get ${url}`, { url })
  await send('get /auth/me', { url: '/auth/me' })
  await send('get /auth/me', { url: '/auth/me', headers: bearer })
  await send('get /auth/login', { url: '/auth/login?returnTo=/home' })
  await send('get /auth/callback', { url: '/auth/callback?state=unknown&code=x' })
  await send('get /appointments', { url: '/appointments', headers: bearer })
  await send('get /appointments', { url: '/appointments' })
  await send('post /auth/session', { method: 'POST', url: '/auth/session', payload: { idToken: await issuer.sign({ email: bob.email, sub: 'sub-bob' }) } })
  await send('post /auth/session', { method: 'POST', url: '/auth/session', payload: { idToken: 'not-a-token' } })
  await send('post /auth/session', { method: 'POST', url: '/auth/session', payload: { other: 1 } })
  await send('post /auth/session', { method: 'POST', url: '/auth/session', headers: { 'content-type': 'text/plain' }, payload: 'text' })
  await send('post /auth/session', { method: 'POST', url: '/auth/session', headers: { cookie: '__Host-bff-session=ambient' }, payload: { idToken: 'x' } })
  await send('post /auth/backchannel-logout', { method: 'POST', url: '/auth/backchannel-logout', headers: { 'content-type': 'application/x-www-form-urlencoded' }, payload: 'logout_token=forged' })
  const ending = `Bearer ${await signIn(app, issuer, bob.email)}`
  await send('post /auth/logout', { method: 'POST', url: '/auth/logout', headers: { authorization: ending } })
  await send('post /auth/logout', { method: 'POST', url: '/auth/logout', headers: { authorization: ending } })

  // The cancel: each answer the key replays, first and replayed; those it never replays.
  await twice(first, 'k-200')
  expect((await cancel(first, { 'idempotency-key': 'k-200' }, JSON.stringify({ reason: 'another' }))).statusCode === 422, 'the key reused with another reason')
  await twice(bob.appointments[0]!.id, 'k-404')
  sandbox.control.setFailure({ kind: 'status', status: 400, body: { status: 400, success: false, message: 'Invalid request', error: 'started' }, endpoint: 'cancel', times: 1 })
  await twice(second, 'k-400')
  sandbox.control.setFailure({ kind: 'status', status: 401, body: { status: 401, success: false, message: 'Unauthorized' }, endpoint: 'cancel', times: 1 })
  await twice(second, 'k-502-auth')
  sandbox.control.setFailure({ kind: 'status', status: 500, body: { status: 500, success: false, message: 'boom' }, endpoint: 'cancel', times: 1 })
  await twice(second, 'k-502')
  // One in flight, the other 409; the one in flight times out (504, never replayed: its retry resolves it).
  sandbox.control.setFailure({ kind: 'slow', delayMs: 1500, endpoint: 'cancel', times: 1 })
  const slow = cancel(second, { 'idempotency-key': 'k-slow' })
  await new Promise((resolve) => setTimeout(resolve, 100))
  const both = await Promise.all([slow, cancel(second, { 'idempotency-key': 'k-slow' })])
  expect(both.map((answer) => answer.statusCode).sort().join() === '409,504', 'one in flight, one timed out')
  expect((await cancel(second, { 'idempotency-key': 'k-slow' })).headers['idempotent-replayed'] === undefined, 'resolved, not replayed')
  await cancel('not-a-uuid')
  await cancel('a'.repeat(300))
  await cancel(third, {}, JSON.stringify({ reason: 'x'.repeat(BODY_LIMIT_BYTES) }))
  await cancel(third, { 'content-type': 'text/plain' }, 'text')
  await send(CANCEL, { method: 'POST', url: `/appointments/${third}/cancel` })
  sandbox.control.setFailure({ kind: 'rate-limited', retryAfter: '7', endpoint: 'cancel', times: 1 })
  await cancel(third, { 'idempotency-key': 'k-429' })

  // A client over the per-IP limit: refused on every route (the probes aside).
  const flood = '198.51.100.7'
  for (let i = 0; i < 100; i++) await app.inject({ url: '/auth/me', remoteAddress: flood })
  for (const [path, operations] of Object.entries(document.paths)) {
    for (const method of Object.keys(operations)) {
      await send(`${method} ${path}`, { method: method.toUpperCase() as 'GET', url: path.replace('{id}', first), remoteAddress: flood })
    }
  }
  // Draining: readiness's own 503.
  app.draining = true
  await send('get /readyz', { url: '/readyz' })

  const isRequired = (header: unknown): boolean => {
    const ref = (header as { $ref?: string }).$ref
    const resolved = ref === undefined ? header : document.components.headers?.[ref.replace('#/components/headers/', '')]
    return (resolved as { required?: boolean } | undefined)?.required === true
  }
  for (const [path, operations] of Object.entries(document.paths)) {
    for (const [method, operation] of Object.entries(operations)) {
      const statuses = Object.keys(operation.responses).filter((status) => sent.has(`${method} ${path} ${status}`))
      if (statuses.length === 0) t.fail(`no answer of ${method} ${path} was checked`)
      for (const status of statuses) {
        const answers = sent.get(`${method} ${path} ${status}`) as Array<Record<string, unknown>>
        const declared = Object.entries(operation.responses[status]?.headers ?? {}).filter(([name]) => CLIENT_HEADERS.includes(name))
        // Documented: each header's name, marked when it is declared required (always sent).
        // Observed: the names some answer carried, marked when every answer carried it; the mark
        // is only looked for on those declared required.
        const documented = declared.map(([name, header]) => isRequired(header) ? `${name} (always)` : name).sort()
        const observed = CLIENT_HEADERS.filter((name) => answers.some((headers) => headers[name] !== undefined))
          .map((name) => declared.some(([declaredName, header]) => declaredName === name && isRequired(header)) && answers.every((headers) => headers[name] !== undefined) ? `${name} (always)` : name)
          .sort()
        t.same(documented, observed, `${method} ${path} ${status}: the headers declared are those sent (${answers.length} answers)`)
      }
    }
  }
  for (const key of sent.keys()) {
    const [method, path, status] = key.split(' ') as [string, string, string]
    if (document.paths[path]?.[method]?.responses[status] === undefined) t.fail(`${key} was answered but is not documented`)
  }
  expect(['409', '413', '415', '422', '429', '504'].every((status) => sent.has(`${CANCEL} ${status}`)), 'the cancel\'s 409, 413, 415, 422, 429 and 504 were among the answers')
})

t.test('every header the service lets browser scripts read is documented', async (t) => {
  const { app } = await buildRecorded(WEB_ENV)
  const document = await documentOf(app)
  const declared = new Set(Object.values(document.paths).flatMap((operations) => Object.values(operations))
    .flatMap((operation) => Object.values(operation.responses)).flatMap((answer) => Object.keys(answer.headers ?? {})))
  t.same(CORS_EXPOSED_HEADERS.filter((name) => !declared.has(name)), [], 'Access-Control-Expose-Headers names only documented headers')
})

t.test('every route with documented query parameters documents the answer to a value it refuses', async (t) => {
  const { app, issuer } = await buildRecorded(WEB_ENV)
  const document = await documentOf(app)
  const token = await signIn(app, issuer)
  let tried = 0
  for (const [path, operations] of Object.entries(document.paths)) {
    for (const [method, operation] of Object.entries(operations)) {
      const query = (operation.parameters ?? []).filter((parameter) => parameter.in === 'query')
      if (query.length === 0) continue
      for (const parameter of query) {
        const response = await app.inject({ method: method.toUpperCase() as 'GET', url: `${path}?${parameter.name}=not-a-value-it-takes`, headers: { authorization: `Bearer ${token}` } })
        tried += 1
        t.ok(operation.responses[String(response.statusCode)], `${method.toUpperCase()} ${path}?${parameter.name}=(refused value): its ${response.statusCode} is documented`)
      }
    }
  }
  t.ok(tried >= 2, 'the document has query parameters to try (returnTo, slide)')
})
