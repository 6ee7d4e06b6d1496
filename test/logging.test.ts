import t from 'tap'
import { Writable } from 'node:stream'
import pino from 'pino'
import { deferredChildLogger, loggerOptions, pathOf, REDACT_PATHS } from '../src/logging.js'
import { loadConfig } from '../src/config.js'

function capture (): { lines: Array<Record<string, unknown>>, stream: Writable } {
  const lines: Array<Record<string, unknown>> = []
  const stream = new Writable({ write (chunk, _encoding, done) { lines.push(JSON.parse(chunk.toString())); done() } })
  return { lines, stream }
}

t.test('the deferred request logger: no child until the first line, then the child with its bindings', async (t) => {
  const { lines, stream } = capture()
  const parent = pino({ level: 'trace' }, stream)
  let children = 0
  const counting = Object.assign(Object.create(parent) as typeof parent, {
    child (...args: Parameters<typeof parent.child>) { children += 1; return parent.child(...args) }
  })
  const log = deferredChildLogger(counting, { reqId: 'r-1' }, {})
  t.equal(log.level, 'trace', 'the parent\'s level while there is no child')
  t.equal(children, 0, 'nothing made yet')
  log.trace('t')
  log.debug({ a: 1 }, 'd')
  log.info('i')
  log.warn('w')
  log.error('e')
  log.fatal('f')
  log.silent('never written')
  t.equal(children, 1, 'one child, made once')
  t.same(lines.map((line) => [line.level, line.msg, line.reqId]), [
    [10, 't', 'r-1'], [20, 'd', 'r-1'], [30, 'i', 'r-1'], [40, 'w', 'r-1'], [50, 'e', 'r-1'], [60, 'f', 'r-1']
  ])
  t.equal(lines[1]?.a, 1)
  log.level = 'error'
  t.equal(log.level, 'error', 'the child\'s level once there is one')
  log.info('dropped')
  log.child({ step: 'inner' }).error('x')
  t.same(lines.at(-1), { ...lines.at(-1), msg: 'x', reqId: 'r-1', step: 'inner' })
  t.equal(lines.length, 7)
})

t.test('the deferred request logger takes a level of its own from Fastify\'s options', async (t) => {
  const parent = pino({ level: 'info' }, capture().stream)
  t.equal(deferredChildLogger(parent, { reqId: 'r-2' }, { level: 'warn' }).level, 'warn')
  const early = deferredChildLogger(parent, { reqId: 'r-3' }, {})
  early.level = 'debug'
  t.equal(early.level, 'debug', 'a level set first makes the child')
})

t.test('pathOf drops the query, whatever it holds', async (t) => {
  t.equal(pathOf('/auth/callback?code=secret&state=x'), '/auth/callback')
  t.equal(pathOf('/appointments'), '/appointments')
  t.equal(pathOf('/?'), '/')
})

t.test('pathOf gives the path the router takes: no fragment, and of an absolute-form target its path alone', async (t) => {
  t.equal(pathOf('/appointments#secret'), '/appointments')
  t.equal(pathOf('/auth/callback?code=secret#x'), '/auth/callback')
  t.equal(pathOf('http://alice:s3cretpw@x/appointments?y=1'), '/appointments', 'never the userinfo')
  t.equal(pathOf('HTTPS://x:443/healthz'), '/healthz')
  t.equal(pathOf('http://x'), '/')
  t.equal(pathOf('http://x?code=secret'), '/')
  t.equal(pathOf('http://a/b@x/healthz'), '/b@x/healthz', 'the authority ends at the first slash, as for the router')
  t.equal(pathOf('*'), '*')
  t.equal(pathOf('x:80'), 'x:80', 'no absolute-form: as it came (the router refused it)')
})

t.test('pathOf ends the authority where the router does, strips userinfo of any scheme, and reads absolute-form only at the start', async (t) => {
  // find-my-way (getPathFromAbsoluteUrl): the authority ends at the first `/` or `?`; `http://x?a/b` is routed as `/`.
  t.equal(pathOf('http://x?a/b'), '/', 'the query begins at the first `?`, slashes after it included')
  t.equal(pathOf('http://x#a/b'), '/', 'nor does a slash after a fragment begin the path')
  // Any scheme: the userinfo never reaches the line, whatever the router makes of the target.
  t.equal(pathOf('web+x.1-a://alice:s3cretpw@x/a'), '/a')
  // Not absolute-form unless it starts so: logged as it came.
  t.equal(pathOf('*http://x/a'), '*http://x/a')
})

t.test('the redaction paths censor reasons wherever they are, so operator fields are named otherwise', async (t) => {
  const { lines, stream } = capture()
  const log = pino({ level: 'info', redact: { paths: REDACT_PATHS, censor: '[redacted]' } }, stream)
  log.info({ reason: 'my symptoms', nested: { reason: 'my symptoms' } }, 'a reason')
  log.warn({ limits: { cause: 'timeout' } }, 'limits: Redis unavailable, counting in per-process memory')
  log.info({ refusal: 'expired' }, 'logout token refused')
  t.same([lines[0]?.reason, (lines[0]?.nested as { reason?: string }).reason], ['[redacted]', '[redacted]'])
  t.same(lines[1]?.limits, { cause: 'timeout' }, 'the fallback says why')
  t.equal(lines[2]?.refusal, 'expired', 'a refused logout token says why')
})

t.test('the service\'s logger: secrets censored at the top of a line and one level below; a request is its method, path and address', async (t) => {
  const { lines, stream } = capture()
  const config = loadConfig({ CV_API_KEY: 'org-secret-key-123', OIDC_ISSUER: 'https://idp.example.com', OIDC_CLIENT_ID: 'patient-web' })
  const log = pino(loggerOptions(config, stream) as pino.LoggerOptions, stream)
  const secrets = { apiKey: 'SECRET-1', keyRoot: 'SECRET-2', token: 'SECRET-3', idToken: 'SECRET-4', id_token: 'SECRET-5', email: 'SECRET-6', reason: 'SECRET-7', access_token: 'SECRET-13', refresh_token: 'SECRET-14', logout_token: 'SECRET-15' }
  const headers = { authorization: 'SECRET-8', cookie: 'SECRET-9', 'cv-api-key': 'SECRET-10', 'set-cookie': 'SECRET-11' }
  log.warn({ ...secrets, headers, nested: { ...secrets } }, 'an object logged by mistake')
  const line = lines[0] as Record<string, Record<string, unknown>>
  t.notMatch(JSON.stringify(line), 'SECRET', 'no secret in the line')
  for (const name of Object.keys(secrets)) {
    t.equal(line[name], '[redacted]', name)
    t.equal(line.nested?.[name], '[redacted]', `nested.${name}`)
  }
  t.same(line.headers, { authorization: '[redacted]', cookie: '[redacted]', 'cv-api-key': '[redacted]', 'set-cookie': '[redacted]' })
  log.info({ req: { method: 'GET', url: '/auth/callback?code=SECRET-12', ip: '192.0.2.7', headers }, res: { statusCode: 302, headers } }, 'request completed')
  t.same(lines[1]?.req, { method: 'GET', url: '/auth/callback', remoteAddress: '192.0.2.7' }, 'the path without its query, and the client\'s address')
  t.same(lines[1]?.res, { statusCode: 302 })
})
