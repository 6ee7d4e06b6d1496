import { randomUUID } from 'node:crypto'
import type { DestinationStream } from 'pino'
import { buildApp, type App, type AppOverrides } from '../../src/app.js'
import { loadConfig, type Config } from '../../src/config.js'
import { startIssuer, type TestIssuer } from './issuer.js'
import { startRedis, type RedisServer } from './redis.js'
import { leaksIn, rememberRequestSecrets, rememberSecret } from './secrets.js'

/**
 * The whole service as a route test sees it: built from config like production, against a real
 * OIDC issuer (and a real Redis when asked), closed when the test ends.
 */

export const TEST_API_KEY = 'test-org-key-0123456789abcdef'

export interface TestAppOptions {
  /** Extra or overriding environment variables. */
  env?: Record<string, string>
  /** `true` starts a Redis for this test; a RedisServer is shared; absent means in-memory state. */
  redis?: boolean | RedisServer
  /**
   * Also gets the log lines (LOG_LEVEL defaults to `info` then, `debug` otherwise). Either way
   * they are scanned for secrets when the app closes (helpers/secrets.ts).
   */
  logStream?: DestinationStream
  /** The Care360 origin; a closed port by default, so no test reaches a real upstream. */
  upstreamUrl?: string
  /** One clock for the app's stores, its ID token checks and the issuer's `iat`. */
  now?: () => number
  /** Passed to buildApp as they are (`now` and `logStream` above win). */
  overrides?: AppOverrides
  /**
   * false: the bearer tokens, cookies and reasons the test injects are not looked for in the log
   * lines (fuzzed text, which a logged path may hold by chance; the fuzz suite scans for its own).
   */
  scanRequests?: boolean
}

export interface TestApp {
  app: App
  config: Config
  issuer: TestIssuer
  redis?: RedisServer
}

interface TestHost { teardown: (fn: () => unknown) => void }

export async function buildTestApp (t: TestHost, options: TestAppOptions = {}): Promise<TestApp> {
  const issuer = await startIssuer(t, options.now === undefined ? {} : { now: options.now })
  const redis = options.redis === true ? await startRedis(t) : options.redis === false ? undefined : options.redis
  const config = loadConfig({
    CV_API_KEY: TEST_API_KEY,
    CV_BASE_URL: options.upstreamUrl ?? 'http://127.0.0.1:9',
    OIDC_ISSUER: issuer.url,
    OIDC_CLIENT_ID: issuer.clientId,
    METRICS_PORT: '0',
    LOG_LEVEL: options.logStream === undefined ? 'debug' : 'info',
    ...(redis === undefined ? {} : { REDIS_URL: redis.url }),
    ...options.env
  })
  rememberSecret('organization key', config.care360.apiKey)
  rememberSecret('web client secret', config.oidc.web?.clientSecret)
  // Every line the app writes, for the scan when it closes; and the test's own stream's, as before.
  const lines: string[] = []
  const given = options.logStream
  const logStream = { write (line: string) { lines.push(line); given?.write(line) } }
  const app = await buildApp(config, {
    // Tests see a rotated key at once; production keeps jose's 30 s cooldown.
    jwksCooldownMs: 0,
    ...options.overrides,
    logStream,
    ...(options.now === undefined ? {} : { now: options.now })
  })
  rememberWhatTheAppHandsOut(app, options.scanRequests ?? true)
  t.teardown(async () => {
    await app.close()
    const leaks = leaksIn(lines)
    if (leaks.length > 0) throw new Error(`the app's log lines hold secrets: ${[...new Set(leaks)].slice(0, 10).join('; ')}`)
  })
  await app.ready()
  if (redis !== undefined) await waitForRedis(app)
  return { app, config, issuer, ...(redis === undefined ? {} : { redis }) }
}

/**
 * The secrets the suite-wide log scan looks for that pass through the app itself: each session
 * the store makes (its token, its patient's email, a web session's ID token), and the bearer
 * tokens, cookies, ID tokens and reasons of every request a test injects.
 */
function rememberWhatTheAppHandsOut (app: App, scanRequests: boolean): void {
  const sessions = app.sessions
  const create = sessions.create.bind(sessions)
  sessions.create = async function createRemembered (input) {
    const made = await create(input)
    rememberSecret('session token', made.token)
    rememberSecret('patient email', input.email)
    rememberSecret('web ID token', input.idToken)
    return made
  }
  if (!scanRequests) return
  const inject = app.inject.bind(app) as (options: unknown) => unknown
  ;(app as unknown as { inject: (options?: unknown) => unknown }).inject = function injectRemembered (options?: unknown) {
    rememberRequestSecrets(options)
    return options === undefined ? inject(undefined) : inject(options)
  }
}

/** The shared client connects asynchronously; tests start once it is ready. */
async function waitForRedis (app: App): Promise<void> {
  const end = Date.now() + 5000
  while (app.sharedState.mode() !== 'redis') {
    /* c8 ignore next -- only when a test's Redis never comes up */
    if (Date.now() > end) throw new Error('shared Redis did not become ready')
    await new Promise((resolve) => setTimeout(resolve, 10))
  }
}

/** Signs in through `POST /auth/session` with a fresh ID token for `email`; returns the session token. */
export async function signIn (app: App, issuer: TestIssuer, email = 'patient@example.com', claims: Record<string, unknown> = {}): Promise<string> {
  // Its own jti: two sign-ins within one second would otherwise be the same token, and a token
  // whose session signed out is retired (it cannot sign in again).
  const idToken = await issuer.sign({ email, sub: `sub-${email}`, jti: randomUUID(), ...claims })
  const response = await app.inject({ method: 'POST', url: '/auth/session', payload: { idToken } })
  if (response.statusCode !== 201) throw new Error(`sign-in failed: ${response.statusCode} ${response.body}`)
  return (response.json() as { data: { token: string } }).data.token
}
