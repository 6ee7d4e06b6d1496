import { closeSync, constants, fstatSync, openSync, readSync } from 'node:fs'
import { isIP } from 'node:net'
import { Type, type StaticDecode, type TSchema } from 'typebox'
import { Value } from 'typebox/value'

/**
 * The service's configuration: every variable of the contract's table, read here and only here.
 * One TypeBox schema validates the raw environment (strings) and decodes each value; the Config
 * type is inferred from it. Below the entry point, configuration travels as data.
 */

export const CARE360_ORIGINS = {
  production: 'https://api.care360-next.carevalidate.com',
  staging: 'https://api-staging.care360-next.carevalidate.com'
} as const

const UNIT_MS = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 } as const
const DURATION = '^([1-9][0-9]{0,8})(ms|s|m|h|d)$'
const RATE = '^([1-9][0-9]{0,8})/([1-9][0-9]{0,8})(ms|s|m|h|d)$'

export function parseDuration (text: string): number {
  const match = new RegExp(DURATION).exec(text)
  if (match === null) throw new Error(`not a duration: ${text}`)
  return Number(match[1]) * UNIT_MS[match[2] as keyof typeof UNIT_MS]
}

export interface Rate { count: number, windowMs: number }

export function parseRate (text: string): Rate {
  const match = new RegExp(RATE).exec(text)
  if (match === null) throw new Error(`not a rate: ${text}`)
  return { count: Number(match[1]), windowMs: Number(match[2]) * UNIT_MS[match[3] as keyof typeof UNIT_MS] }
}

export function isLoopbackHost (hostname: string): boolean {
  const host = hostname.replace(/^\[|\]$/g, '').toLowerCase()
  if (host === 'localhost' || host === '::1') return true
  return isIP(host) === 4 && host.startsWith('127.')
}

const NOT_HTTPS = 'must be an https URL (http only for localhost, 127.0.0.0/8 or ::1)'

/**
 * Why a URL cannot be an origin-style URL (https anywhere, plain http only on loopback, nothing
 * but scheme, host and port, and a path where the variable takes one), or null: said for what is
 * wrong with it, since "must be an https URL" for an https URL with a query sends the operator
 * looking at the wrong part.
 */
function originProblem (value: string): string | null {
  let url: URL
  try { url = new URL(value) } catch { return 'not a URL (scheme://host[:port], with a port from 1 to 65535)' }
  if (!(url.protocol === 'https:' || (url.protocol === 'http:' && isLoopbackHost(url.hostname)))) return NOT_HTTPS
  if (url.username !== '' || url.password !== '') return 'must not hold user information (user:password@)'
  // The href, not search and hash: an empty query or fragment (a bare ? or #) is '' there as when
  // absent, yet the text is kept as written (PUBLIC_URL "https://host/#" made ".../#/auth/callback").
  if (/[?#]/.test(url.href)) return 'must not hold a query (?) or a fragment (#)'
  return null
}

const list = (text: string): string[] => text.split(',').map((item) => item.trim()).filter((item) => item !== '')
/** A list that must name something: `,` alone would accept no token at all. */
function nonEmptyList (text: string): string[] {
  const items = list(text)
  if (items.length === 0) throw new Error('a comma list with at least one item')
  return items
}

/**
 * Upper bounds of durations. The syntax alone allows 999999999d, past what a Date can hold: a
 * session's expiry then throws at every sign-in. A session never needs to outlive a year; a rate
 * window longer than a day is no longer a rate limit (and holds its counters as long).
 */
const MAX_SESSION_TTL = '365d'
const MAX_RATE_WINDOW = '1d'
/** Longer than any endpoint list takes to forget a replica; it adds to the shutdown's deadline. */
const MAX_SHUTDOWN_DELAY = '1m'

/** A duration in ms, refused beyond `max`. */
function durationUpTo (value: string, max: string): number {
  const ms = parseDuration(value)
  if (ms > parseDuration(max)) throw new Error(`at most ${max}`)
  return ms
}
const Duration = (description: string, max: string) =>
  Type.Decode(Type.String({ pattern: DURATION, description }), (value) => durationUpTo(value, max))
/** A Duration where 0 (any unit, or none: what Helm charts template for "off") means none. */
const OptionalDelay = (description: string, max: string) =>
  Type.Decode(Type.String({ pattern: `^0(ms|s|m|h|d)?$|${DURATION}`, description }), (value) => /^0[a-z]*$/.test(value) ? 0 : durationUpTo(value, max))
const RateSpec = (description: string) =>
  Type.Decode(Type.String({ pattern: RATE, description }), (value) => {
    const rate = parseRate(value)
    if (rate.windowMs > parseDuration(MAX_RATE_WINDOW)) throw new Error(`a window of at most ${MAX_RATE_WINDOW}`)
    return rate
  })
/** 0 is a port only where it means "off" (METRICS_PORT): to listen on it picks a random port. */
const Port = (description: string, zeroDisables: boolean) =>
  Type.Decode(Type.String({ pattern: '^(0|[1-9][0-9]{0,4})$', description }), (value) => {
    const port = Number(value)
    if (port > 65535) throw new Error('port out of range')
    if (port === 0 && !zeroDisables) throw new Error('a port from 1 to 65535; 0 would listen on a random one')
    return port
  })
/**
 * A listen address: an IP address, or a hostname of RFC 1123 syntax (labels of letters, digits and
 * inner hyphens, an optional root dot; not all-numeric at the end, which would be a mistyped IPv4
 * address). Anything else only fails at listen, after the rest of start-up.
 */
const HOSTNAME_LABEL = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/i
function isHostname (value: string): boolean {
  const name = value.endsWith('.') ? value.slice(0, -1) : value
  const labels = name.split('.')
  return name.length <= 253 && labels.every((label) => HOSTNAME_LABEL.test(label)) && !/^[0-9]+$/.test(labels[labels.length - 1] as string)
}
const ListenHost = (description: string) =>
  Type.Decode(Type.String({ minLength: 1, description }), (value) => {
    if (isIP(value) === 0 && !isHostname(value)) throw new Error('an IP address (IPv6 without brackets) or a hostname')
    return value
  })
const PositiveInt = (description: string, max: number) =>
  Type.Decode(Type.String({ pattern: '^[1-9][0-9]{0,8}$', description }), (value) => {
    const n = Number(value)
    if (n > max) throw new Error(`at most ${max}`)
    return n
  })
/** An origin-style URL: https anywhere, plain http only on loopback; without a trailing slash. */
function secureUrl (value: string): string {
  const problem = originProblem(value)
  if (problem !== null) throw new Error(problem)
  return value.replace(/\/+$/, '')
}
/** The identity provider's issuer, kept as typed: OpenID Connect compares it as a string. */
const IssuerUrl = (description: string) => Type.Decode(Type.String({ minLength: 1, description }), secureUrl)
/**
 * A URL a browser is sent to (PUBLIC_URL, WEB_APP_URL), kept as a URL writes it (WHATWG
 * serialization: an internationalized host as its A-label, `xn--...`, in lower case; no default
 * port; the path percent-encoded): the sign-in puts it into Location headers, which carry ASCII
 * only, and into OAuth parameters that the identity provider compares with the URIs registered
 * there, as a browser reaches them.
 */
const BrowserUrl = (description: string) =>
  Type.Decode(Type.String({ minLength: 1, description }), (value) => secureUrl(new URL(secureUrl(value)).href))
/**
 * The upstream's origin (the contract: CV_BASE_URL "overrides the origin"). A path is refused: the
 * vendor documents whole endpoint URLs, and one pasted here would put every call under a path the
 * upstream answers with 404s.
 */
const UpstreamOrigin = (description: string) =>
  Type.Decode(Type.String({ minLength: 1, description }), (value) => {
    const problem = originProblem(value)
    if (problem !== null) throw new Error(problem)
    const url = new URL(value)
    if (url.pathname !== '/') throw new Error('must be an origin, without a path (the service adds the API\'s paths)')
    return url.origin
  })
/** An entry as a refusal quotes it: any user information (a password, which no origin has) left out. */
function quoted (entry: string): string {
  return entry.replace(/^((?:[a-z][a-z0-9+.-]*:)?\/\/)?.*@/i, '$1[user information]@')
}
/**
 * Origins that get credentialed CORS and pass the CSRF Origin check: the rule of SecureUrl, since
 * a plain-http origin can be answered by anyone on the path between the browser and its host.
 */
const OriginList = (description: string) =>
  Type.Decode(Type.String({ description }), (value) => {
    const origins = list(value)
    for (const origin of origins) {
      const problem = originProblem(origin)
      if (problem !== null) throw new Error(`${problem === NOT_HTTPS ? 'not an https origin (http only for localhost, 127.0.0.0/8 or ::1)' : `not an origin: ${problem}`}: ${quoted(origin)}`)
      if (new URL(origin).origin !== origin.replace(/\/$/, '')) throw new Error(`not an origin: ${quoted(origin)}`)
    }
    return origins.map((origin) => new URL(origin).origin)
  })
const AddressList = (description: string) =>
  Type.Decode(Type.String({ description }), (value) => {
    const entries = list(value)
    for (const entry of entries) {
      const [address, bits, extra] = entry.split('/') as [string, string?, string?]
      const family = isIP(address)
      const maxBits = family === 6 ? 128 : 32
      const okBits = bits === undefined || (/^[0-9]{1,3}$/.test(bits) && Number(bits) <= maxBits)
      if (family === 0 || !okBits || extra !== undefined) throw new Error(`not an address or CIDR: ${entry}`)
      // Also refused by Fastify's proxy-addr, later, with a stack trace naming no variable.
      if (Number(bits) === 0) throw new Error(`${entry} trusts every address: any client could write its own X-Forwarded-For`)
    }
    return entries
  })

/**
 * The highest database number accepted in REDIS_URL's path. Redis has 16 (0 to 15) unless its
 * `databases` setting says more; a number past the server's is only seen at connection (an error
 * line; the connection is dropped and retried, the shared state degraded meanwhile).
 */
const MAX_REDIS_DB = 1_000_000
/** The one query parameter accepted (ioredis takes every parameter as a client option: see RedisUrl). */
const REDIS_FAMILIES = new Set(['0', '4', '6'])

/**
 * The problem with a Redis URL, or null: said without quoting any part of it, since the URL may
 * carry a password. ioredis 6.1 parses it as here (WHATWG `new URL`, then `decodeURIComponent` of
 * the user name and password), so a URL accepted here is the one it connects with; one it cannot
 * parse would instead throw at start-up with the URL, password and all, in the stack trace. It
 * takes the path as the database number (SELECT NaN on `/abc` crashed the process once listening),
 * and every query parameter as a client option, overriding those of createSharedState, so none is
 * accepted but `family`. TLS follows only the literal lowercase `rediss://` (the schema's pattern).
 */
export function redisUrlProblem (value: string): string | null {
  let url: URL
  try {
    url = new URL(value)
  } catch {
    return 'not a URL: percent-encode reserved characters of the user name and password (such as @ : / ? # %), and give a port from 1 to 65535'
  }
  if (url.protocol !== 'redis:' && url.protocol !== 'rediss:') return 'must start with redis:// or rediss://'
  if (url.hostname === '') return 'no host'
  // `new URL` refuses a port above 65535 and writes :00 as 0.
  if (url.port === '0') return 'the port must be from 1 to 65535'
  // Only a fragment can hold a # of a URL that parses; ioredis would drop it and what follows.
  if (value.includes('#')) return 'a fragment (#) is not accepted; percent-encode # in the password as %23'
  const db = /^\/([0-9]{1,7})$/.exec(url.pathname)?.[1]
  if (url.pathname !== '' && url.pathname !== '/' && (db === undefined || Number(db) > MAX_REDIS_DB)) {
    return `the path must be empty or /<database number> (digits, at most ${MAX_REDIS_DB}); percent-encode / in the password as %2F`
  }
  const query = [...url.searchParams]
  if (query.length > 1 || query.some(([key, family]) => key !== 'family' || !REDIS_FAMILIES.has(family))) {
    return 'the only query parameter accepted is family (0, 4 or 6), once; percent-encode ? in the password as %3F'
  }
  for (const [part, text] of [['user name', url.username], ['password', url.password]] as const) {
    try {
      decodeURIComponent(text)
    } catch {
      return `the ${part} holds a % that is not a valid percent-escape (write % itself as %25)`
    }
  }
  return null
}
const RedisUrl = (description: string) =>
  Type.Decode(Type.String({ pattern: '^rediss?://', description }), (value) => {
    const problem = redisUrlProblem(value)
    if (problem !== null) throw new Error(problem)
    return value
  })

const API_KEY_SYNTAX = /^[\x21-\x7e]+$/
const SERVICE_SECRET_SYNTAX = /^[\x21-\x7e]{32,}$/

/** The raw environment, one property per variable of the contract. */
export const EnvSchema = Type.Object({
  CV_ENV: Type.Optional(Type.Union([Type.Literal('production'), Type.Literal('staging')], { description: 'production or staging' })),
  CV_BASE_URL: Type.Optional(UpstreamOrigin('overrides the origin chosen by CV_ENV')),
  CV_API_KEY: Type.Optional(Type.String({ pattern: API_KEY_SYNTAX.source, description: 'the organization key (visible ASCII)' })),
  CV_API_KEY_FILE: Type.Optional(Type.String({ minLength: 1, description: 'a file holding the organization key' })),
  // Not in the contract's table (the team's addition): the service's own secret, the root of the
  // keys it derives for itself (the patient hash of logs and idempotency records, the seal of the
  // sign-in state), so that they outlive a rotation of the organization key. Optional: without
  // it they derive from the organization key, as before it existed.
  SERVICE_SECRET: Type.Optional(Type.String({ pattern: SERVICE_SECRET_SYNTAX.source, description: 'at least 32 visible ASCII characters' })),
  SERVICE_SECRET_FILE: Type.Optional(Type.String({ minLength: 1, description: 'a file holding the service secret' })),
  CV_RATE_LIMIT: Type.Optional(RateSpec('org-wide upstream budget, <count>/<window>')),
  CV_TIMEOUT_MS: Type.Optional(PositiveInt('deadline of one upstream call in ms', 600_000)),
  HOST: Type.Optional(ListenHost('listen address')),
  PORT: Type.Optional(Port('listen port', false)),
  METRICS_PORT: Type.Optional(Port('Prometheus port, 0 disables', true)),
  REDIS_URL: Type.Optional(RedisUrl('redis:// or rediss:// URL')),
  OIDC_ISSUER: IssuerUrl('the patient identity provider'),
  OIDC_CLIENT_ID: Type.Optional(Type.String({ minLength: 1 })),
  OIDC_CLIENT_SECRET: Type.Optional(Type.String({ minLength: 1 })),
  OIDC_AUDIENCES: Type.Optional(Type.Decode(Type.String({ minLength: 1 }), nonEmptyList)),
  PUBLIC_URL: Type.Optional(BrowserUrl('the public origin of this service')),
  // Not in the contract's table (the team's addition): where the patient web app lives when it
  // is not served from PUBLIC_URL's origin. Sign-in ends there (returnTo, signin_error).
  WEB_APP_URL: Type.Optional(BrowserUrl('the patient web app origin')),
  SESSION_IDLE_TTL: Type.Optional(Duration('session idle lifetime, e.g. 30m', MAX_SESSION_TTL)),
  SESSION_ABSOLUTE_TTL: Type.Optional(Duration('session absolute lifetime, e.g. 12h', MAX_SESSION_TTL)),
  RATE_LIMIT_IP: Type.Optional(RateSpec('per client IP, <count>/<window>')),
  RATE_LIMIT_SESSION: Type.Optional(RateSpec('per session, <count>/<window>')),
  RATE_LIMIT_CANCEL: Type.Optional(RateSpec('cancels per session, <count>/<window>')),
  CORS_ORIGINS: Type.Optional(OriginList('comma list of web origins')),
  TRUST_PROXY: Type.Optional(AddressList('comma list of proxy addresses or CIDRs')),
  OWNERSHIP_CHECK: Type.Optional(Type.Union([Type.Literal('on'), Type.Literal('off')])),
  REPLICAS: Type.Optional(PositiveInt('the most replicas that run at once', 10_000)),
  LOG_LEVEL: Type.Optional(Type.Union(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].map((level) => Type.Literal(level)))),
  // Not in the contract's table (the team's addition): at SIGTERM, how long to stay unready
  // (serving, /readyz 503) before the listener closes (app.ts, shutDown).
  SHUTDOWN_DELAY: Type.Optional(OptionalDelay('time unready before the listener closes at shutdown, e.g. 5s; 0 for none', MAX_SHUTDOWN_DELAY))
})

export type Env = StaticDecode<typeof EnvSchema>

/** Thrown by loadConfig; its message names every bad variable and never contains a secret (a key, a password). */
export class ConfigError extends Error {
  readonly variables: string[]
  constructor (problems: Array<[string, string]>) {
    super(`Invalid configuration:\n${problems.map(([name, why]) => `  ${name}: ${why}`).join('\n')}`)
    this.name = 'ConfigError'
    this.variables = problems.map(([name]) => name)
  }
}

function assemble (env: Env, apiKey: string, serviceSecret: string | null) {
  const clientId = env.OIDC_CLIENT_ID
  const web = clientId !== undefined && env.OIDC_CLIENT_SECRET !== undefined && env.PUBLIC_URL !== undefined
    ? { clientId, clientSecret: env.OIDC_CLIENT_SECRET, publicUrl: env.PUBLIC_URL, webAppUrl: env.WEB_APP_URL ?? env.PUBLIC_URL }
    : null
  const corsOrigins = new Set(env.CORS_ORIGINS ?? [])
  if (env.PUBLIC_URL !== undefined) corsOrigins.add(new URL(env.PUBLIC_URL).origin)
  if (env.WEB_APP_URL !== undefined) corsOrigins.add(new URL(env.WEB_APP_URL).origin)
  return {
    care360: {
      env: env.CV_ENV ?? 'staging',
      baseUrl: env.CV_BASE_URL ?? CARE360_ORIGINS[env.CV_ENV ?? 'staging'],
      apiKey,
      timeoutMs: env.CV_TIMEOUT_MS ?? 5000
    },
    /**
     * The root of the keys the service derives for itself (each under its own HKDF label):
     * SERVICE_SECRET, else the organization key. `fromApiKey` says which.
     */
    keyRoot: { secret: serviceSecret ?? apiKey, fromApiKey: serviceSecret === null },
    orgBudget: env.CV_RATE_LIMIT ?? parseRate('450/60s'),
    host: env.HOST ?? '0.0.0.0',
    ...listenPorts(env.PORT, env.METRICS_PORT),
    redisUrl: env.REDIS_URL ?? null,
    oidc: {
      issuer: env.OIDC_ISSUER,
      // loadConfig refuses a configuration with neither.
      audiences: env.OIDC_AUDIENCES ?? [clientId as string],
      /** Web sign-in (confidential client); null when not configured. */
      web
    },
    sessions: sessionLifetimes(env.SESSION_IDLE_TTL, env.SESSION_ABSOLUTE_TTL),
    limits: {
      ip: env.RATE_LIMIT_IP ?? parseRate('300/1m'),
      session: env.RATE_LIMIT_SESSION ?? parseRate('60/1m'),
      cancel: env.RATE_LIMIT_CANCEL ?? parseRate('5/1m')
    },
    corsOrigins: corsOrigins as ReadonlySet<string>,
    trustProxy: env.TRUST_PROXY ?? [],
    ownershipCheck: (env.OWNERSHIP_CHECK ?? 'on') === 'on',
    replicas: env.REPLICAS ?? 1,
    logLevel: env.LOG_LEVEL ?? 'info',
    shutdownDelayMs: env.SHUTDOWN_DELAY ?? 0
  }
}

export type Config = ReturnType<typeof assemble>

function listenPorts (port: number | undefined, metricsPort: number | undefined): { port: number, metricsPort: number } {
  return { port: port ?? 3000, metricsPort: metricsPort ?? 9464 }
}

function sessionLifetimes (idleMs: number | undefined, absoluteMs: number | undefined): { idleTtlMs: number, absoluteTtlMs: number } {
  // Unset, the idle lifetime is the default's 30 min, or the absolute one when that is shorter.
  return { idleTtlMs: idleMs ?? Math.min(parseDuration('30m'), absoluteMs ?? Infinity), absoluteTtlMs: absoluteMs ?? parseDuration('12h') }
}

/**
 * The rules between variables, each checked once its variables are good on their own (a default
 * standing in for one unset), so that one message names them beside every other bad variable.
 */
function checkTogether (raw: Record<string, string>, decoded: Record<string, unknown>, problems: Array<[string, string]>): void {
  const bad = new Set(problems.map(([name]) => name))
  if (!bad.has('SESSION_IDLE_TTL') && !bad.has('SESSION_ABSOLUTE_TTL')) {
    const sessions = sessionLifetimes(decoded.SESSION_IDLE_TTL as number | undefined, decoded.SESSION_ABSOLUTE_TTL as number | undefined)
    if (sessions.idleTtlMs > sessions.absoluteTtlMs) {
      problems.push(['SESSION_IDLE_TTL', raw.SESSION_ABSOLUTE_TTL === undefined
        ? 'must not exceed SESSION_ABSOLUTE_TTL (12h when unset)'
        : 'must not exceed SESSION_ABSOLUTE_TTL'])
    }
  }
  // Both listeners share HOST: the same port would fail at listen, after start-up, with a stack trace.
  if (!bad.has('PORT') && !bad.has('METRICS_PORT')) {
    const { port, metricsPort } = listenPorts(decoded.PORT as number | undefined, decoded.METRICS_PORT as number | undefined)
    if (metricsPort !== 0 && metricsPort === port) {
      problems.push(['METRICS_PORT', raw.METRICS_PORT === undefined
        ? `must differ from PORT (METRICS_PORT defaults to ${metricsPort}; set another port, or 0 to disable metrics)`
        : 'must differ from PORT (or 0 to disable metrics)'])
    }
  }
}

const KNOWN = new Set(Object.keys(EnvSchema.properties))

/** Levenshtein distance, for the near misses below (names are short: at most a few dozen characters). */
function distance (a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j)
  for (let i = 1; i <= a.length; i++) {
    const current = [i]
    for (let j = 1; j <= b.length; j++) {
      current[j] = Math.min((previous[j] as number) + 1, (current[j - 1] as number) + 1, (previous[j - 1] as number) + (a[i - 1] === b[j - 1] ? 0 : 1))
    }
    previous = current
  }
  return previous[b.length] as number
}

/**
 * Variables this service does not read whose names are a near miss of one it does (`CV_APIKEY`,
 * `RATE_LIMIT_SESION`, `REDIS_URI`, `log_level`): set, they change nothing, and the default stands
 * in silently. Each as [its name, the name it nearly spells]: one edit away, or two for names of 8
 * characters or more (so that `HOME` or `TERM` are not taken for `HOST` or `PORT`), or the same
 * name in another case. Never a value. The entry point writes a warning for each.
 */
export function unknownVariables (source: Record<string, string | undefined>): Array<[string, string]> {
  const found: Array<[string, string]> = []
  for (const name of Object.keys(source)) {
    if (KNOWN.has(name) || source[name] === undefined) continue
    const meant = [...KNOWN].find((known) => known === name.toUpperCase() || distance(name, known) <= (known.length >= 8 ? 2 : 1))
    if (meant !== undefined) found.push([name, meant])
  }
  return found
}

/**
 * Reads the configuration from an environment map (process.env at the entry point, a plain object
 * in tests). Throws a ConfigError naming every bad variable.
 */
export function loadConfig (source: Record<string, string | undefined>): Config {
  // Only the contract's variables, and an empty value counts as unset (as in most deployments).
  const raw: Record<string, string> = {}
  for (const [name, value] of Object.entries(source)) {
    if (KNOWN.has(name) && value !== undefined && value !== '') raw[name] = value
  }
  const problems: Array<[string, string]> = []
  const decoded: Record<string, unknown> = {}
  for (const name of Object.keys(EnvSchema.properties) as Array<keyof typeof EnvSchema.properties>) {
    const schema: TSchema = EnvSchema.properties[name]
    const value = raw[name]
    if (value === undefined) {
      if (!(EnvSchema.required as string[]).includes(name)) continue
      problems.push([name, 'is required'])
      continue
    }
    if (!Value.Check(schema, value)) {
      problems.push([name, describe(schema)])
      continue
    }
    try {
      decoded[name] = Value.Decode(schema, value)
    } catch (error) {
      // Only our own decoders throw here (the key has none), and their messages never quote the value.
      problems.push([name, `is invalid (${(error as Error).message})`])
    }
  }
  const apiKey = secretOf(raw, 'CV_API_KEY', API_KEY_SYNTAX, 'one key of visible ASCII characters', problems) ?? ''
  const serviceSecret = secretOf(raw, 'SERVICE_SECRET', SERVICE_SECRET_SYNTAX, 'one secret of at least 32 visible ASCII characters', problems)
  const webParts = ['OIDC_CLIENT_ID', 'OIDC_CLIENT_SECRET', 'PUBLIC_URL'] as const
  const present = webParts.filter((name) => raw[name] !== undefined)
  if (raw.OIDC_CLIENT_SECRET !== undefined || raw.PUBLIC_URL !== undefined) {
    for (const name of webParts) {
      if (raw[name] === undefined) problems.push([name, `is required for web sign-in (set with ${present.join(', ')})`])
    }
  }
  if (raw.OIDC_AUDIENCES === undefined && raw.OIDC_CLIENT_ID === undefined) {
    problems.push(['OIDC_AUDIENCES', 'is required when OIDC_CLIENT_ID is not set'])
  }
  checkTogether(raw, decoded, problems)
  if (problems.length > 0) throw new ConfigError(problems)
  return assemble(Value.Decode(EnvSchema, raw), apiKey, serviceSecret)
}

/**
 * A secret given either as `name` or as a file named by `name`_FILE (container secrets), never
 * both; the organization key is required, the service secret is not (null when absent). The
 * environment's value was checked with the schema; a file's is checked here. No message quotes
 * either.
 */
function secretOf (raw: Record<string, string>, name: 'CV_API_KEY' | 'SERVICE_SECRET', syntax: RegExp, what: string, problems: Array<[string, string]>): string | null {
  const fileName = `${name}_FILE`
  const value = raw[name]
  const file = raw[fileName]
  if (value !== undefined && file !== undefined) {
    problems.push([name, `set exactly one of ${name} and ${fileName}`])
    return null
  }
  if (file === undefined) {
    if (value === undefined && name === 'CV_API_KEY') problems.push([name, `is required (or ${fileName})`])
    if (value !== undefined && name === 'CV_API_KEY' && isQuoted(value)) {
      problems.push([name, QUOTED])
      return null
    }
    return value ?? null
  }
  try {
    const held = readSecretFile(file)
    if (held === null) {
      problems.push([fileName, `must be a regular file of at most ${MAX_SECRET_FILE_BYTES} bytes`])
      return null
    }
    if (syntax.test(held)) {
      if (name === 'CV_API_KEY' && isQuoted(held)) problems.push([fileName, QUOTED])
      else return held
    } else {
      problems.push([fileName, `the file must hold ${what}`])
    }
  } catch (error) {
    problems.push([fileName, `cannot be read (${String((error as NodeJS.ErrnoException).code)})`])
  }
  return null
}

/** Far more than any key or secret: a file larger than this is the wrong file. */
const MAX_SECRET_FILE_BYTES = 4096

/**
 * The trimmed text of a secret's file, or null when it is no regular file (a FIFO nobody writes
 * would block start-up for ever, `/dev/zero` fill memory) or larger than MAX_SECRET_FILE_BYTES.
 * Opened without blocking, so that a FIFO is refused rather than waited on.
 */
function readSecretFile (file: string): string | null {
  const fd = openSync(file, constants.O_RDONLY | constants.O_NONBLOCK)
  try {
    if (!fstatSync(fd).isFile()) return null
    const buffer = Buffer.alloc(MAX_SECRET_FILE_BYTES + 1)
    let length = 0
    for (let read = -1; read !== 0 && length < buffer.length;) {
      read = readSync(fd, buffer, length, buffer.length - length, null)
      length += read
    }
    return length > MAX_SECRET_FILE_BYTES ? null : buffer.toString('utf8', 0, length).trim()
  } finally {
    closeSync(fd)
  }
}

/**
 * A key wrapped in a pair of quotes: `docker run --env-file` and compose's `environment:` list
 * keep them (CV_API_KEY="..."), and the upstream would refuse every call with it (502
 * UPSTREAM_AUTH_FAILED). No organization key is written that way.
 */
const isQuoted = (key: string): boolean => /^(["'`]).*\1$/.test(key)
const QUOTED = 'the key is wrapped in quotes, which would be sent as part of it (docker env files and compose keep quotes): remove them'

function describe (schema: TSchema): string {
  const s = schema as { description?: string, anyOf?: Array<{ const?: unknown }> }
  if (s.anyOf !== undefined) return `must be one of ${s.anyOf.map((item) => String(item.const)).join(', ')}`
  return `is invalid (expected ${String(s.description)})`
}
