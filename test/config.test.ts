import t from 'tap'
import { spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Redis } from 'ioredis'
import { CARE360_ORIGINS, ConfigError, EnvSchema, isLoopbackHost, loadConfig, parseDuration, parseRate, redisUrlProblem, unknownVariables } from '../src/config.js'

const base = { CV_API_KEY: 'org-secret-key-123', OIDC_ISSUER: 'https://idp.example.com', OIDC_CLIENT_ID: 'patient-web' }

function refusal (env: Record<string, string | undefined>): ConfigError {
  try {
    loadConfig(env)
  } catch (error) {
    if (error instanceof ConfigError) return error
    throw error
  }
  throw new Error('configuration was accepted')
}

t.test('defaults of the contract', async (t) => {
  const config = loadConfig(base)
  t.equal(config.care360.baseUrl, CARE360_ORIGINS.staging)
  t.equal(config.care360.timeoutMs, 5000)
  t.same(config.orgBudget, { count: 450, windowMs: 60_000 })
  t.equal(config.host, '0.0.0.0')
  t.equal(config.port, 3000)
  t.equal(config.metricsPort, 9464)
  t.equal(config.redisUrl, null)
  t.same(config.oidc.audiences, ['patient-web'])
  t.equal(config.oidc.web, null)
  t.same(config.sessions, { idleTtlMs: 30 * 60_000, absoluteTtlMs: 12 * 3_600_000 })
  t.same(config.limits, { ip: { count: 300, windowMs: 60_000 }, session: { count: 60, windowMs: 60_000 }, cancel: { count: 5, windowMs: 60_000 } })
  t.same([...config.corsOrigins], [])
  t.same(config.trustProxy, [])
  t.equal(config.ownershipCheck, true)
  t.equal(config.replicas, 1)
  t.equal(config.logLevel, 'info')
})

t.test('every variable read and decoded', async (t) => {
  const config = loadConfig({
    ...base,
    CV_ENV: 'production',
    CV_RATE_LIMIT: '100/10s',
    CV_TIMEOUT_MS: '1500',
    HOST: '127.0.0.1',
    PORT: '8080',
    METRICS_PORT: '0',
    REDIS_URL: 'redis://127.0.0.1:6379',
    OIDC_CLIENT_SECRET: 'client-secret',
    OIDC_AUDIENCES: 'patient-web, patient-mobile',
    PUBLIC_URL: 'https://patients.example.com/',
    SESSION_IDLE_TTL: '15m',
    SESSION_ABSOLUTE_TTL: '8h',
    RATE_LIMIT_IP: '1000/1m',
    RATE_LIMIT_SESSION: '30/30s',
    RATE_LIMIT_CANCEL: '2/1h',
    CORS_ORIGINS: 'https://app.example.com,https://beta.example.com',
    TRUST_PROXY: '10.0.0.0/8, 192.168.1.10, ::1',
    OWNERSHIP_CHECK: 'off',
    REPLICAS: '3',
    LOG_LEVEL: 'warn',
    SHUTDOWN_DELAY: '5s',
    UNRELATED: 'ignored'
  })
  t.equal(config.care360.baseUrl, CARE360_ORIGINS.production)
  t.equal(config.care360.env, 'production')
  t.same(config.orgBudget, { count: 100, windowMs: 10_000 })
  t.equal(config.care360.timeoutMs, 1500)
  t.equal(config.port, 8080)
  t.equal(config.metricsPort, 0)
  t.equal(config.redisUrl, 'redis://127.0.0.1:6379')
  t.same(config.oidc.audiences, ['patient-web', 'patient-mobile'])
  t.same(config.oidc.web, { clientId: 'patient-web', clientSecret: 'client-secret', publicUrl: 'https://patients.example.com', webAppUrl: 'https://patients.example.com' })
  const split = loadConfig({ ...base, OIDC_CLIENT_SECRET: 's', PUBLIC_URL: 'https://api.example.com', WEB_APP_URL: 'https://app.example.com/' })
  t.equal(split.oidc.web?.webAppUrl, 'https://app.example.com')
  t.same([...split.corsOrigins], ['https://api.example.com', 'https://app.example.com'])
  // The URLs a browser is sent to are kept as a URL writes them; the issuer, compared as a string
  // with the tokens' iss, as typed.
  const typed = loadConfig({ ...base, OIDC_ISSUER: 'https://IdP.example.com:443/Realm/', OIDC_CLIENT_SECRET: 's', PUBLIC_URL: 'https://API.example.com:443/b f/', WEB_APP_URL: 'https://bücher.example/app' })
  t.equal(typed.oidc.web?.publicUrl, 'https://api.example.com/b%20f')
  t.equal(typed.oidc.web?.webAppUrl, 'https://xn--bcher-kva.example/app')
  t.equal(typed.oidc.issuer, 'https://IdP.example.com:443/Realm')
  // Every trailing slash goes: the discovery document is fetched at `${issuer}/.well-known/...`.
  t.equal(loadConfig({ ...base, OIDC_ISSUER: 'https://idp.example.com/realm//' }).oidc.issuer, 'https://idp.example.com/realm')
  t.same(config.sessions, { idleTtlMs: 15 * 60_000, absoluteTtlMs: 8 * 3_600_000 })
  t.same(config.limits.cancel, { count: 2, windowMs: 3_600_000 })
  t.same([...config.corsOrigins], ['https://app.example.com', 'https://beta.example.com', 'https://patients.example.com'])
  t.same(config.trustProxy, ['10.0.0.0/8', '192.168.1.10', '::1'])
  t.equal(config.ownershipCheck, false)
  t.equal(config.replicas, 3)
  t.equal(config.logLevel, 'warn')
  t.equal(config.shutdownDelayMs, 5000)
  t.equal(loadConfig(base).shutdownDelayMs, 0, 'no delay unless asked')
  t.same(refusal({ ...base, SHUTDOWN_DELAY: '2m' }).variables, ['SHUTDOWN_DELAY'], 'at most a minute')
  t.same(refusal({ ...base, SHUTDOWN_DELAY: '5' }).variables, ['SHUTDOWN_DELAY'])
})

t.test('SHUTDOWN_DELAY: 0 (any zero duration) means none, as unset', async (t) => {
  for (const zero of ['0', '0s', '0ms', '0m', '0h', '0d']) {
    t.equal(loadConfig({ ...base, SHUTDOWN_DELAY: zero }).shutdownDelayMs, 0, zero)
  }
  t.equal(loadConfig({ ...base, SHUTDOWN_DELAY: '1m' }).shutdownDelayMs, 60_000, 'the bound itself')
  t.equal(loadConfig({ ...base, SHUTDOWN_DELAY: '250ms' }).shutdownDelayMs, 250)
  for (const bad of ['61s', '00', '0x', '-0', '0 s', '01s', '5']) {
    t.same(refusal({ ...base, SHUTDOWN_DELAY: bad }).variables, ['SHUTDOWN_DELAY'], bad)
  }
  t.match(refusal({ ...base, SHUTDOWN_DELAY: '61s' }).message, 'at most 1m')
})

t.test('CV_BASE_URL overrides CV_ENV; plain http only on loopback', async (t) => {
  t.equal(loadConfig({ ...base, CV_BASE_URL: 'http://127.0.0.1:4010/' }).care360.baseUrl, 'http://127.0.0.1:4010')
  t.equal(loadConfig({ ...base, CV_BASE_URL: 'http://localhost:4010' }).care360.baseUrl, 'http://localhost:4010')
  t.equal(loadConfig({ ...base, CV_BASE_URL: 'http://[::1]:4010' }).care360.baseUrl, 'http://[::1]:4010')
  t.equal(loadConfig({ ...base, CV_ENV: 'production', CV_BASE_URL: 'https://care360.internal' }).care360.baseUrl, 'https://care360.internal')
  for (const bad of ['http://10.0.0.1:4010', 'http://example.com', 'ftp://127.0.0.1', 'not a url', 'https://user:pw@example.com', 'https://user@example.com', 'http://127.0.0.1.evil.com']) {
    t.same(refusal({ ...base, CV_BASE_URL: bad }).variables, ['CV_BASE_URL'], bad)
  }
  // The origin only: the vendor's table gives whole endpoint URLs, easily pasted here.
  t.equal(loadConfig({ ...base, CV_BASE_URL: 'https://API.example.com:443' }).care360.baseUrl, 'https://api.example.com')
  for (const bad of ['https://api-staging.care360-next.carevalidate.com/api/v1/calendar/appointments/cancel', 'http://127.0.0.1:4010/care360', 'http://127.0.0.1:4010//']) {
    t.same(refusal({ ...base, CV_BASE_URL: bad }).variables, ['CV_BASE_URL'], bad)
  }
})

t.test('OIDC_ISSUER, PUBLIC_URL, WEB_APP_URL: no user information, query or fragment', async (t) => {
  // Kept as written (less a trailing /): a query or a fragment would be carried into the issuer
  // that ID tokens are checked against, and into every address built on the public URL.
  const web = { OIDC_CLIENT_SECRET: 'client-secret', PUBLIC_URL: 'https://patients.example.com' }
  for (const name of ['OIDC_ISSUER', 'PUBLIC_URL', 'WEB_APP_URL']) {
    t.doesNotThrow(() => loadConfig({ ...base, ...web, [name]: 'https://host.example.com/' }), name)
    for (const bad of ['https://host.example.com/?x=1', 'https://host.example.com/#top', 'https://user@host.example.com']) {
      t.same(refusal({ ...base, ...web, [name]: bad }).variables, [name], `${name}=${bad}`)
    }
  }
})

t.test('OIDC_ISSUER, PUBLIC_URL, WEB_APP_URL: an empty query or fragment (a bare ? or #) is refused too', async (t) => {
  // The URL parser reports both as '' (as when absent), yet the text is kept as written: PUBLIC_URL
  // "https://patients.example.com/#" made the redirect URI ".../#/auth/callback".
  const web = { OIDC_CLIENT_SECRET: 'client-secret', PUBLIC_URL: 'https://patients.example.com' }
  for (const name of ['OIDC_ISSUER', 'PUBLIC_URL', 'WEB_APP_URL']) {
    for (const bad of ['https://host.example.com/#', 'https://host.example.com?', 'https://host.example.com/?#']) {
      const error = refusal({ ...base, ...web, [name]: bad })
      t.same(error.variables, [name], `${name}=${bad}`)
      t.match(error.message, /query \(\?\) or a fragment \(#\)/, `${name}=${bad}: says why`)
    }
  }
})

t.test('an https URL refused for its user information, query, fragment or port says that, not "must be an https URL"', async (t) => {
  const web = { OIDC_CLIENT_SECRET: 'client-secret', PUBLIC_URL: 'https://patients.example.com' }
  const cases: Array<[string, string, RegExp]> = [
    ['CV_BASE_URL', 'https://user:pw-secret@api.example.com', /user information/],
    ['CV_BASE_URL', 'https://:pw-secret@api.example.com', /user information/],
    ['CV_BASE_URL', 'https://api.example.com?x=1', /query/],
    ['OIDC_ISSUER', 'https://idp.example.com/#top', /fragment/],
    ['PUBLIC_URL', 'https://user@patients.example.com', /user information/],
    ['CV_BASE_URL', 'http://[::1]:x', /not a URL/],
    ['PUBLIC_URL', 'https://patients.example.com:99999', /not a URL/],
    ['WEB_APP_URL', 'https://[::1', /not a URL/],
    ['CV_BASE_URL', 'http://10.0.0.5:4010', /must be an https URL/],
    ['CORS_ORIGINS', 'https://app.example.com?x=1', /query/]
  ]
  for (const [name, value, why] of cases) {
    const error = refusal({ ...base, ...web, [name]: value })
    t.same(error.variables, [name], `${name}=${value}`)
    t.match(error.message, why, `${name}=${value}: ${String(why)}`)
    t.notMatch(error.message, 'pw-secret', 'never a password')
  }
})

t.test('REDIS_URL: what ioredis would fail on stops start-up, naming the part, never quoting the URL', async (t) => {
  // Each of these passed the old `^rediss?://` check: ioredis then threw at start-up with the URL
  // (password and all) in the stack trace, or, for a path that is not a number, sent SELECT NaN
  // and killed the process once it was listening.
  const cases: Array<[string, string | RegExp, string[]]> = [
    ['redis://default:SuperSecretPw@127.0.0.1:99999', 'port from 1 to 65535', ['SuperSecretPw', 'default']],
    ['redis://:pa#ss@127.0.0.1:6560', 'percent-encode', ['pa#ss', ':pa', '6560']],
    ['redis://:pa/ss@127.0.0.1:6560', 'percent-encode', ['pa/ss', 'ss@']],
    ['redis://:pa?ss@127.0.0.1:6560', 'percent-encode', ['pa?ss']],
    ['redis://:Super%ZZ@cache.internal', 'password holds a %', ['Super', '%ZZ', 'cache.internal']],
    ['redis://Us%E0er:pw@cache.internal', 'user name holds a %', ['Us', 'E0er']],
    ['redis://127.0.0.1:6560/abc', 'the path must be empty or /<database number>', ['abc']],
    ['redis://127.0.0.1:6560/-1', 'the path must be empty or /<database number>', []],
    ['redis://127.0.0.1:6560/1000001', 'at most 1000000', ['1000001']],
    ['redis://127.0.0.1:6560/0/', 'the path must be empty', []],
    ['redis://127.0.0.1:6560/%31', 'the path must be empty', ['%31']],
    // A # or / that ends the authority early: what follows would be a fragment or a path.
    ['redis://admin:4242#Secret9@cache.internal', 'fragment (#)', ['Secret9', 'admin', '4242']],
    ['redis://admin:4242/Secret9@cache.internal', 'the path must be empty', ['Secret9', 'admin']],
    ['redis://cache.internal:6379#', 'fragment (#)', []],
    ['redis://cache.internal:0', 'port must be from 1 to 65535', []],
    ['redis://cache.internal:000', 'port must be from 1 to 65535', []],
    ['redis://:SecretPw@/0', 'not a URL', ['SecretPw']],
    ['redis:///var/run/redis.sock', 'no host', ['redis.sock']],
    // Every query parameter becomes a client option of ioredis, overriding createSharedState's.
    ['redis://cache.internal?password=QuerySecret', 'the only query parameter accepted is family', ['QuerySecret']],
    ['redis://cache.internal?enableOfflineQueue=true', 'family (0, 4 or 6)', ['enableOfflineQueue']],
    ['rediss://cache.internal?tls=RedisCloudFixed', 'family', ['RedisCloudFixed']],
    ['redis://cache.internal?db=4', 'family', []],
    ['redis://cache.internal?family=5', 'family', []],
    ['redis://cache.internal?family=6&family=4', 'family', []],
    ['redis://cache.internal:6379 with spaces', 'not a URL', ['spaces']]
  ]
  for (const [url, part, secrets] of cases) {
    const error = refusal({ ...base, REDIS_URL: url })
    t.same(error.variables, ['REDIS_URL'], url)
    const lines = error.message.split('\n').filter((line) => line.includes('REDIS_URL'))
    t.equal(lines.length, 1, `one line: ${url}`)
    t.match(lines[0], /^ {2}REDIS_URL: is invalid \(/, url)
    t.match(error.message, part, url)
    t.notOk(error.message.includes(url), `the URL is not quoted: ${url}`)
    for (const secret of secrets) t.notOk(error.message.includes(secret), `${secret} not in the message of ${url}`)
  }
  // The operator's case, verbatim: the password appears nowhere in the message.
  const leaked = refusal({ ...base, REDIS_URL: 'redis://default:SuperSecretPw@127.0.0.1:99999' })
  t.notMatch(leaked.message, /SuperSecret/i)
  // Upper case would parse, but ioredis turns TLS on only for the literal `rediss://`.
  for (const bad of ['REDISS://cache.internal', 'Redis://cache.internal', ' redis://cache.internal', 'cache.internal:6379']) {
    t.same(refusal({ ...base, REDIS_URL: bad }).variables, ['REDIS_URL'], bad)
  }
  t.equal(redisUrlProblem('http://cache.internal'), 'must start with redis:// or rediss://', 'the scheme, for a caller without the schema')
  t.equal(redisUrlProblem('redis://cache.internal'), null)
})

t.test('REDIS_URL: the server refuses to start with one line, no stack trace, no password', async (t) => {
  // The operator's run: this URL used to crash start-up inside ioredis with the URL in the trace.
  const run = spawnSync(process.execPath, ['--import', 'tsx', 'src/server.ts'], {
    // tap follows spawned processes; a tsx-compiled child's coverage of src/ maps onto other lines
    // than the suite's own and would corrupt its report (as in test/fault/sigterm.test.ts).
    env: { ...base, _TAPJS_PROCESSINFO_COVERAGE_: '0', HOST: '127.0.0.1', PORT: '1', METRICS_PORT: '0', REDIS_URL: 'redis://default:SuperSecretPw@127.0.0.1:99999' },
    encoding: 'utf8',
    timeout: 30_000
  })
  t.equal(run.status, 1)
  t.equal(run.stdout, '')
  t.notMatch(run.stderr, /SuperSecret/i)
  t.same(run.stderr.trimEnd().split('\n'), ['Invalid configuration:', run.stderr.split('\n')[1]])
  t.match(run.stderr.split('\n')[1], /^ {2}REDIS_URL: is invalid \(/)
})

t.test('REDIS_URL: what is accepted reaches ioredis as written (password, ACL user, database, TLS)', async (t) => {
  const cases: Array<[string, { host: string, port: number, db: number, username: string | null, password: string | null, tls: boolean, family?: number }]> = [
    ['redis://127.0.0.1:6379', { host: '127.0.0.1', port: 6379, db: 0, username: null, password: null, tls: false }],
    ['redis://cache.internal', { host: 'cache.internal', port: 6379, db: 0, username: null, password: null, tls: false }],
    ['redis://cache.internal/', { host: 'cache.internal', port: 6379, db: 0, username: null, password: null, tls: false }],
    ['redis://:pw@cache.internal:6380/3', { host: 'cache.internal', port: 6380, db: 3, username: '', password: 'pw', tls: false }],
    ['redis://bff:s3cret@cache.internal:6379/0', { host: 'cache.internal', port: 6379, db: 0, username: 'bff', password: 's3cret', tls: false }],
    // Reserved characters percent-encoded: @ / # ? : % and a space.
    ['redis://bff:p%40ss%2Fw%23o%3Fr%3Ad%25%20x@cache.internal:6379/15', { host: 'cache.internal', port: 6379, db: 15, username: 'bff', password: 'p@ss/w#o?r:d% x', tls: false }],
    // An @ in the password also works unencoded (the last @ ends the user info).
    ['redis://:p@ss@cache.internal', { host: 'cache.internal', port: 6379, db: 0, username: '', password: 'p@ss', tls: false }],
    ['rediss://bff:pw@redis.example.com:6380/1000000', { host: 'redis.example.com', port: 6380, db: 1_000_000, username: 'bff', password: 'pw', tls: true }],
    ['redis://[::1]:6379/2', { host: '::1', port: 6379, db: 2, username: null, password: null, tls: false }],
    ['redis://cache.internal:6379/1?family=6', { host: 'cache.internal', port: 6379, db: 1, username: null, password: null, tls: false, family: 6 }]
  ]
  for (const [url, want] of cases) {
    t.equal(loadConfig({ ...base, REDIS_URL: url }).redisUrl, url, `accepted: ${url}`)
    const client = new Redis(url, { lazyConnect: true })
    const { host, port, db, username, password, tls, family } = client.options
    client.disconnect()
    t.same({ host, port, db, username, password, tls: tls !== undefined && tls !== null && (tls as unknown) !== false, ...(want.family === undefined ? {} : { family }) }, want, `as ioredis reads it: ${url}`)
  }
})

t.test('the key: exactly one of CV_API_KEY and CV_API_KEY_FILE, never echoed', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'bff-config-'))
  const file = join(dir, 'key')
  writeFileSync(file, 'file-held-key-456\n')
  const { CV_API_KEY: _key, ...noKey } = base
  t.equal(loadConfig({ ...noKey, CV_API_KEY_FILE: file }).care360.apiKey, 'file-held-key-456')
  t.same(refusal(noKey).variables, ['CV_API_KEY'])
  const both = refusal({ ...base, CV_API_KEY_FILE: file })
  t.same(both.variables, ['CV_API_KEY'])
  t.notMatch(both.message, 'org-secret-key-123')
  t.same(refusal({ ...noKey, CV_API_KEY_FILE: join(dir, 'missing') }).variables, ['CV_API_KEY_FILE'])
  writeFileSync(file, 'two words\n')
  const badFile = refusal({ ...noKey, CV_API_KEY_FILE: file })
  t.same(badFile.variables, ['CV_API_KEY_FILE'])
  t.notMatch(badFile.message, 'two words')
  const badKey = refusal({ ...base, CV_API_KEY: 'has a space-secret' })
  t.same(badKey.variables, ['CV_API_KEY'])
  t.notMatch(badKey.message, 'space-secret')
})

t.test('the key in quotes (docker env files and compose keep them) is refused, never echoed', async (t) => {
  const { CV_API_KEY: _key, ...noKey } = base
  for (const quoted of ['"org-secret-key-123"', "'org-secret-key-123'", '`org-secret-key-123`']) {
    const error = refusal({ ...base, CV_API_KEY: quoted })
    t.same(error.variables, ['CV_API_KEY'])
    t.match(error.message, 'quotes')
    t.notMatch(error.message, 'org-secret-key-123')
  }
  const dir = mkdtempSync(join(tmpdir(), 'bff-config-'))
  const file = join(dir, 'key')
  writeFileSync(file, '"file-held-key-456"\n')
  const inFile = refusal({ ...noKey, CV_API_KEY_FILE: file })
  t.same(inFile.variables, ['CV_API_KEY_FILE'])
  t.notMatch(inFile.message, 'file-held-key-456')
  // A quote inside the key, or on one side only, is the key's own.
  t.equal(loadConfig({ ...base, CV_API_KEY: 'a"b' }).care360.apiKey, 'a"b')
  t.equal(loadConfig({ ...base, CV_API_KEY: '"ab' }).care360.apiKey, '"ab')
  t.equal(loadConfig({ ...base, CV_API_KEY: '"ab\'' }).care360.apiKey, '"ab\'')
  t.equal(loadConfig({ ...base, CV_API_KEY: 'k"ab"' }).care360.apiKey, 'k"ab"', 'quotes that do not begin the key')
  t.equal(loadConfig({ ...base, CV_API_KEY: '"' }).care360.apiKey, '"', 'one quote is no pair')
  // An empty pair (CV_API_KEY="" in an env file) is quotes too, not a key of two characters.
  t.match(refusal({ ...base, CV_API_KEY: '""' }).message, 'quotes')
  // A quoted service secret is left alone: sent nowhere, the same on every replica.
  t.equal(loadConfig({ ...base, SERVICE_SECRET: `"${'x'.repeat(32)}"` }).keyRoot.fromApiKey, false)
  writeFileSync(file, `"${'x'.repeat(32)}"\n`)
  t.equal(loadConfig({ ...base, SERVICE_SECRET_FILE: file }).keyRoot.secret, `"${'x'.repeat(32)}"`, 'in its file too')
})

t.test('a key or secret file must be a regular file of at most 4096 bytes (never blocking on a FIFO)', async (t) => {
  const { CV_API_KEY: _key, ...noKey } = base
  const dir = mkdtempSync(join(tmpdir(), 'bff-config-'))
  const file = join(dir, 'key')
  writeFileSync(file, `${'k'.repeat(4095)}\n`)
  t.equal(loadConfig({ ...noKey, CV_API_KEY_FILE: file }).care360.apiKey, 'k'.repeat(4095), '4096 bytes with the newline: read whole')
  writeFileSync(file, 'k'.repeat(4097))
  t.match(refusal({ ...noKey, CV_API_KEY_FILE: file }).message, 'CV_API_KEY_FILE: must be a regular file of at most 4096 bytes', '4097 bytes')
  for (const notAFile of [dir, '/dev/zero']) {
    t.match(refusal({ ...noKey, CV_API_KEY_FILE: notAFile }).message, 'CV_API_KEY_FILE: must be a regular file', notAFile)
    t.match(refusal({ ...base, SERVICE_SECRET_FILE: notAFile }).message, 'SERVICE_SECRET_FILE: must be a regular file', notAFile)
  }
  const fifo = join(dir, 'fifo')
  t.equal(spawnSync('mkfifo', [fifo]).status, 0)
  t.match(refusal({ ...noKey, CV_API_KEY_FILE: fifo }).message, 'CV_API_KEY_FILE: must be a regular file', 'a FIFO nobody writes: refused, not waited on')
})

t.test('a key or secret file is closed once read, whether it is taken or refused', { skip: !existsSync('/proc/self/fd') && 'no /proc/self/fd' }, async (t) => {
  const { CV_API_KEY: _key, ...noKey } = base
  const dir = mkdtempSync(join(tmpdir(), 'bff-config-'))
  const file = join(dir, 'key')
  writeFileSync(file, 'org-secret-key-123\n')
  const open = (): number => readdirSync('/proc/self/fd').length
  const before = open()
  for (let i = 0; i < 20; i++) {
    loadConfig({ ...noKey, CV_API_KEY_FILE: file })
    refusal({ ...noKey, CV_API_KEY_FILE: dir })
  }
  t.equal(open(), before, 'no descriptor left open')
})

t.test('unknownVariables: near misses of the names read, for the start-up warning', async (t) => {
  t.same(unknownVariables({ RATE_LIMIT_SESION: '10/1m', CV_APIKEY: 'x', REDIS_URI: 'redis://r', cv_env: 'production', HOME: '/root', TERM: 'xterm', REDIS_PORT: 'tcp://10.0.0.1:6379', PORT: '3000', HOSTNAME: 'pod-1', NODE_ENV: 'production' }),
    [['RATE_LIMIT_SESION', 'RATE_LIMIT_SESSION'], ['CV_APIKEY', 'CV_API_KEY'], ['REDIS_URI', 'REDIS_URL'], ['cv_env', 'CV_ENV']], 'near misses only, not the environment\'s usual names')
  t.same(unknownVariables({ CV_API_KEY: 'x', LOG_LEVEL: 'info', CV_APIKEY: undefined }), [], 'known names, and an unset one')
  // Each kind of edit counts one; two are a near miss from 8 characters on (REPLICAS), one below.
  t.same(unknownVariables({ CV_ENB: 'x', CV_EN: 'x', CV_ENVV: 'x', REPLICSA: '2', RATE_LIMT_SESION: '10/1m', CV_EMB: 'x' }),
    [['CV_ENB', 'CV_ENV'], ['CV_EN', 'CV_ENV'], ['CV_ENVV', 'CV_ENV'], ['REPLICSA', 'REPLICAS'], ['RATE_LIMT_SESION', 'RATE_LIMIT_SESSION']], 'a substitution, a deletion, an insertion; two edits of a long name, not of a short one')
})

t.test('SERVICE_SECRET: optional, or from a file, at least 32 characters, never echoed', async (t) => {
  const secret = 'service-secret-0123456789abcdef-xyz'
  t.same(loadConfig(base).keyRoot, { secret: 'org-secret-key-123', fromApiKey: true }, 'the org key without it')
  t.same(loadConfig({ ...base, SERVICE_SECRET: secret }).keyRoot, { secret, fromApiKey: false })
  const dir = mkdtempSync(join(tmpdir(), 'bff-config-'))
  const file = join(dir, 'secret')
  writeFileSync(file, `${secret}\n`)
  t.same(loadConfig({ ...base, SERVICE_SECRET_FILE: file }).keyRoot, { secret, fromApiKey: false })
  const both = refusal({ ...base, SERVICE_SECRET: secret, SERVICE_SECRET_FILE: file })
  t.same(both.variables, ['SERVICE_SECRET'])
  t.notMatch(both.message, secret)
  const short = refusal({ ...base, SERVICE_SECRET: 'short-service-secret' })
  t.same(short.variables, ['SERVICE_SECRET'])
  t.notMatch(short.message, 'short-service-secret')
  t.match(short.message, 'at least 32')
  t.same(loadConfig({ ...base, SERVICE_SECRET: 'x'.repeat(32) }).keyRoot, { secret: 'x'.repeat(32), fromApiKey: false }, '32 characters')
  t.same(refusal({ ...base, SERVICE_SECRET: 'x'.repeat(31) }).variables, ['SERVICE_SECRET'], '31 characters')
  writeFileSync(file, 'short-file-secret\n')
  const shortFile = refusal({ ...base, SERVICE_SECRET_FILE: file })
  t.same(shortFile.variables, ['SERVICE_SECRET_FILE'])
  t.notMatch(shortFile.message, 'short-file-secret')
  t.same(refusal({ ...base, SERVICE_SECRET_FILE: join(dir, 'missing') }).variables, ['SERVICE_SECRET_FILE'])
  // Problems with the key and the secret are reported together.
  const { CV_API_KEY: _key, ...noKey } = base
  t.same(refusal({ ...noKey, SERVICE_SECRET_FILE: join(dir, 'missing') }).variables, ['CV_API_KEY', 'SERVICE_SECRET_FILE'])
})

t.test('one message naming every bad variable', async (t) => {
  const error = refusal({
    CV_API_KEY: 'k',
    CV_ENV: 'prod',
    OIDC_ISSUER: 'http://idp.example.com',
    CV_RATE_LIMIT: '450',
    CV_TIMEOUT_MS: '0',
    PORT: '99999',
    METRICS_PORT: 'x',
    REDIS_URL: 'localhost:6379',
    SESSION_IDLE_TTL: '30',
    RATE_LIMIT_IP: '0/1m',
    CORS_ORIGINS: 'https://app.example.com/path',
    TRUST_PROXY: '10.0.0.0/40',
    OWNERSHIP_CHECK: 'yes',
    REPLICAS: '-1',
    LOG_LEVEL: 'verbose',
    PUBLIC_URL: 'https://patients.example.com'
  })
  t.same(new Set(error.variables), new Set([
    'CV_ENV', 'OIDC_ISSUER', 'CV_RATE_LIMIT', 'CV_TIMEOUT_MS', 'PORT', 'METRICS_PORT', 'REDIS_URL', 'SESSION_IDLE_TTL',
    'RATE_LIMIT_IP', 'CORS_ORIGINS', 'TRUST_PROXY', 'OWNERSHIP_CHECK', 'REPLICAS', 'LOG_LEVEL',
    'OIDC_CLIENT_ID', 'OIDC_CLIENT_SECRET', 'OIDC_AUDIENCES'
  ]))
  for (const name of error.variables) t.match(error.message, name)
})

t.test('required variables and cross-variable rules', async (t) => {
  t.same(new Set(refusal({}).variables), new Set(['OIDC_ISSUER', 'CV_API_KEY', 'OIDC_AUDIENCES']))
  t.same(refusal({ ...base, OIDC_CLIENT_ID: '', OIDC_AUDIENCES: '' }).variables, ['OIDC_AUDIENCES'], 'empty counts as unset')
  t.same(loadConfig({ ...base, OIDC_CLIENT_ID: undefined, OIDC_AUDIENCES: 'mobile' }).oidc.audiences, ['mobile'])
  t.same(refusal({ ...base, OIDC_AUDIENCES: ' , ' }).variables, ['OIDC_AUDIENCES'], 'a list of nothing stops start-up')
  t.same(refusal({ ...base, SESSION_IDLE_TTL: '13h' }).variables, ['SESSION_IDLE_TTL'])
  t.match(refusal({ ...base, SESSION_IDLE_TTL: '13h' }).message, /SESSION_ABSOLUTE_TTL \(12h when unset\)/, 'names the default it is above')
  t.same(loadConfig({ ...base, SESSION_ABSOLUTE_TTL: '10m' }).sessions, { idleTtlMs: 10 * 60_000, absoluteTtlMs: 10 * 60_000 }, 'an absolute lifetime under 30 min alone: the idle one follows it')
  t.same(refusal({ ...base, SESSION_IDLE_TTL: '20m', SESSION_ABSOLUTE_TTL: '10m' }).variables, ['SESSION_IDLE_TTL'], 'both set, the idle one longer: refused')
  t.same(refusal({ ...base, CV_TIMEOUT_MS: '600001' }).variables, ['CV_TIMEOUT_MS'])
  t.equal(loadConfig({ ...base, CV_TIMEOUT_MS: '600000' }).care360.timeoutMs, 600_000, 'the bound itself')
  t.equal(loadConfig({ ...base, REPLICAS: '10000' }).replicas, 10_000, 'the bound itself')
  t.same(refusal({ ...base, REPLICAS: '10001' }).variables, ['REPLICAS'])
  t.match(refusal({ ...base, REPLICAS: '10001' }).message, 'at most 10000')
  t.same(refusal({ ...base, CORS_ORIGINS: 'not-an-origin' }).variables, ['CORS_ORIGINS'])
})

t.test('CORS_ORIGINS: https origins, plain http only on loopback (as PUBLIC_URL)', async (t) => {
  t.same([...loadConfig({ ...base, CORS_ORIGINS: 'http://localhost:5173, http://127.0.0.1:8080, http://[::1]:3000, https://app.example.com' }).corsOrigins],
    ['http://localhost:5173', 'http://127.0.0.1:8080', 'http://[::1]:3000', 'https://app.example.com'])
  for (const bad of ['http://app.example.com', 'https://app.example.com,http://10.0.0.1:8080', 'http://127.0.0.1.evil.com', 'ftp://127.0.0.1', 'https://user:pw@app.example.com']) {
    const error = refusal({ ...base, CORS_ORIGINS: bad })
    t.same(error.variables, ['CORS_ORIGINS'], bad)
    t.match(error.message, 'https', bad)
  }
  // An origin has no user information; a refusal quotes the entry without it (stderr, logs).
  for (const bad of ['https://user:s3cret@app.example.com', 'https://app.example.com,http://me:s3cret@127.0.0.1/x', 'user:s3cret@app.example.com', 'https://user:s3/cret@app.example.com']) {
    const error = refusal({ ...base, CORS_ORIGINS: bad })
    t.notMatch(error.message, 's3cret', bad)
    t.match(error.message, '[user information]@', bad)
  }
  t.same(refusal({ ...base, TRUST_PROXY: 'proxy.local' }).variables, ['TRUST_PROXY'])
  t.same(loadConfig({ ...base, TRUST_PROXY: '192.168.1.10/32, ::1/128, 2001:db8::/48' }).trustProxy, ['192.168.1.10/32', '::1/128', '2001:db8::/48'], 'a prefix up to the family\'s bits')
  for (const bad of ['10.0.0.0/33', '::1/129', '10.0.0.0/-1', '10.0.0.0/']) {
    t.same(refusal({ ...base, TRUST_PROXY: bad }).variables, ['TRUST_PROXY'], bad)
  }
  t.same(refusal({ ...base, TRUST_PROXY: '10.0.0.1/8/1' }).variables, ['TRUST_PROXY'])
})

t.test('TRUST_PROXY: a /0 prefix stops start-up with the message naming the variable, not a stack trace from Fastify', async (t) => {
  // Accepted here, then refused by @fastify/proxy-addr inside Fastify(): the server exited with
  // "TypeError: invalid range on address: 0.0.0.0/0" and its stack, naming no variable. Trusting
  // every address would also believe any client's X-Forwarded-For.
  for (const value of ['0.0.0.0/0', '::/0', '10.0.0.0/8, 0.0.0.0/0']) {
    const error = refusal({ ...base, TRUST_PROXY: value })
    t.same(error.variables, ['TRUST_PROXY'], value)
    t.match(error.message, 'trusts every address', value)
  }
})

t.test('PORT: 1 to 65535, never METRICS_PORT', async (t) => {
  t.equal(loadConfig({ ...base, PORT: '1' }).port, 1)
  t.equal(loadConfig({ ...base, PORT: '65535' }).port, 65535)
  for (const name of ['PORT', 'METRICS_PORT']) {
    const above = refusal({ ...base, [name]: '65536' })
    t.same(above.variables, [name], `${name}=65536: past the last port (Node's listen would throw)`)
    t.match(above.message, 'port out of range')
  }
  const zero = refusal({ ...base, PORT: '0' })
  t.same(zero.variables, ['PORT'], 'PORT=0 would listen on a random port')
  t.match(zero.message, 'random')
  t.equal(loadConfig({ ...base, METRICS_PORT: '0' }).metricsPort, 0, 'METRICS_PORT=0 still disables metrics')
  const same = refusal({ ...base, PORT: '8080', METRICS_PORT: '8080' })
  t.same(same.variables, ['METRICS_PORT'])
  t.match(same.message, /METRICS_PORT: must differ from PORT/)
  t.same(refusal({ ...base, PORT: '9464' }).variables, ['METRICS_PORT'], 'PORT on the default metrics port')
  t.match(refusal({ ...base, PORT: '9464' }).message, 'METRICS_PORT defaults to 9464', 'unset: the message says the default is what clashes')
  t.notMatch(same.message, 'defaults to', 'set: no default to speak of')
  t.equal(loadConfig({ ...base, PORT: '9464', METRICS_PORT: '0' }).port, 9464, 'fine with metrics off')
  t.equal(loadConfig({ ...base, PORT: '9464', METRICS_PORT: '9465' }).port, 9464)
  const both = refusal({ ...base, PORT: '8080', METRICS_PORT: '8080', SESSION_IDLE_TTL: '13h' })
  t.same(both.variables, ['SESSION_IDLE_TTL', 'METRICS_PORT'], 'cross-variable problems are reported together')
  // ... and beside the variables bad on their own, in one message (the operator mends them at once).
  const all = refusal({ ...base, CV_ENV: 'prod', PORT: '3000', METRICS_PORT: '3000', SESSION_IDLE_TTL: '13h' })
  t.same(all.variables, ['CV_ENV', 'SESSION_IDLE_TTL', 'METRICS_PORT'], 'a bad value and both cross-variable conflicts')
  // A rule between variables is not judged on a bad one (its default would stand in wrongly).
  t.same(refusal({ ...base, PORT: 'x', METRICS_PORT: '9464' }).variables, ['PORT'])
  t.same(refusal({ ...base, PORT: '9464', METRICS_PORT: '0x' }).variables, ['METRICS_PORT'])
  t.same(refusal({ ...base, SESSION_IDLE_TTL: '13h', SESSION_ABSOLUTE_TTL: 'soon' }).variables, ['SESSION_ABSOLUTE_TTL'])
  t.same(refusal({ ...base, SESSION_IDLE_TTL: 'forever', SESSION_ABSOLUTE_TTL: '1m' }).variables, ['SESSION_IDLE_TTL'])
  t.notMatch(refusal({ ...base, SESSION_IDLE_TTL: 'forever', SESSION_ABSOLUTE_TTL: '1m' }).message, 'must not exceed')
})

t.test('HOST: an IP address or a hostname', async (t) => {
  // 253 characters is the longest name (RFC 1035's 255 octets on the wire), a root dot aside.
  const longest = `${'a'.repeat(63)}.${'b'.repeat(63)}.${'c'.repeat(63)}.${'d'.repeat(61)}`
  t.equal(longest.length, 253)
  t.equal(loadConfig({ ...base, HOST: longest }).host, longest, 'the longest name')
  t.equal(loadConfig({ ...base, HOST: `${longest}.` }).host, `${longest}.`, 'and its root dot')
  t.same(refusal({ ...base, HOST: `${longest}d` }).variables, ['HOST'], '254 characters')
  for (const good of ['0.0.0.0', '127.0.0.1', '::', '::1', 'fe80::1%eth0', 'localhost', 'bff-1.internal.example.com', 'bff.example.com.', 'a']) {
    t.equal(loadConfig({ ...base, HOST: good }).host, good, good)
  }
  for (const bad of ['no such host!', '[::1]', '10.0.0.256', '1.2.3', 'host_name', '-bad.example.com', 'bad-.example.com', 'a..b', 'example.com..', '.', `${'a'.repeat(64)}.example.com`, `${'a.'.repeat(127)}aa`, '127.0.0.1:3000', 'http://localhost']) {
    const error = refusal({ ...base, HOST: bad })
    t.same(error.variables, ['HOST'], bad)
    t.match(error.message, 'IP address', bad)
  }
})

t.test('durations have a sane upper bound, said in the message', async (t) => {
  const year = loadConfig({ ...base, SESSION_IDLE_TTL: '365d', SESSION_ABSOLUTE_TTL: '365d' })
  t.same(year.sessions, { idleTtlMs: 365 * 86_400_000, absoluteTtlMs: 365 * 86_400_000 })
  for (const name of ['SESSION_IDLE_TTL', 'SESSION_ABSOLUTE_TTL']) {
    for (const bad of ['200000000d', '366d', '8761h', '999999999m']) {
      const error = refusal({ ...base, SESSION_ABSOLUTE_TTL: '365d', [name]: bad })
      t.same(error.variables, [name], `${name}=${bad}`)
      t.match(error.message, 'at most 365d', `${name}=${bad}`)
    }
  }
  for (const name of ['CV_RATE_LIMIT', 'RATE_LIMIT_IP', 'RATE_LIMIT_SESSION', 'RATE_LIMIT_CANCEL']) {
    const config = loadConfig({ ...base, [name]: '10/1d' })
    t.same([config.orgBudget, config.limits.ip, config.limits.session, config.limits.cancel].filter((rate) => rate.windowMs === 86_400_000), [{ count: 10, windowMs: 86_400_000 }], `${name}=10/1d`)
    for (const bad of ['5/200000000d', '5/2d', '5/25h']) {
      const error = refusal({ ...base, [name]: bad })
      t.same(error.variables, [name], `${name}=${bad}`)
      t.match(error.message, 'at most 1d', `${name}=${bad}`)
    }
  }
})

t.test('.env.example: how to load it is true, and what it holds is a valid configuration', async (t) => {
  const example = readFileSync('.env.example', 'utf8')
  // Nothing in the service reads .env: the file tells to pass it to Node, with npm start's command.
  const start = (JSON.parse(readFileSync('package.json', 'utf8')) as { scripts: { start: string } }).scripts.start
  const command = /^#\s+(node --env-file=\.env .*)$/m.exec(example)?.[1]
  t.equal(command, start.replace(/^node /, 'node --env-file=.env '), 'the header gives npm start\'s command with --env-file=.env')
  // Loaded by Node exactly so (from a clean environment), the file's values pass the schema.
  const loaded = spawnSync(process.execPath, ['--env-file=.env.example', '-p', 'JSON.stringify(process.env)'], { env: {}, encoding: 'utf8' })
  t.equal(loaded.status, 0, loaded.stderr)
  const env = JSON.parse(loaded.stdout) as Record<string, string>
  t.doesNotThrow(() => loadConfig(env))
  for (const name of Object.keys(EnvSchema.properties)) t.match(example, new RegExp(`^(# )?${name}=`, 'm'), `${name} is listed`)
})

t.test('parsers', async (t) => {
  t.equal(parseDuration('250ms'), 250)
  t.equal(parseDuration('2d'), 172_800_000)
  t.same(parseRate('5/1m'), { count: 5, windowMs: 60_000 })
  t.throws(() => parseDuration('1w'))
  t.throws(() => parseRate('5/0s'))
  t.ok(isLoopbackHost('127.8.9.10'))
  t.ok(isLoopbackHost('[::1]'))
  t.ok(isLoopbackHost('LOCALHOST'))
  t.notOk(isLoopbackHost('128.0.0.1'))
  t.notOk(isLoopbackHost('localhost.example.com'))
})
