import fp from 'fastify-plugin'
import type { FastifyBaseLogger, FastifyInstance, FastifyReply, FastifyRequest, FastifyServerOptions, HookHandlerDoneFunction } from 'fastify'
import type { Bindings, ChildLoggerOptions } from 'pino'
import type { DestinationStream } from 'pino'
import { afterEveryAnswer, socketAnswerOf } from './plugins/after-answer.js'
import type { Config } from './config.js'

/**
 * What may never reach a log line: the key, session tokens, cookies, ID tokens, authorization
 * codes, patient emails and cancellation reasons. The request serializer logs the path without
 * its query (the sign-in callback carries a code there). The paths below are a safety net for an
 * object logged by mistake, and a narrow one: pino matches them at the top level of a line and
 * one level below it (`*.email`), not deeper (`{ err: { cause: { email } } }` would pass). What
 * is logged is therefore built field by field from values that cannot carry a secret, and
 * test/security/log-capture.test.ts scans every line of whole flows for the secrets themselves.
 * A field of our own must not be named like a path here (`reason`, `email`, `token`): it would be
 * censored.
 */
export const REDACT_PATHS = [
  'req.headers.authorization',
  'req.headers.cookie',
  'req.headers["cv-api-key"]',
  'res.headers["set-cookie"]',
  'headers.authorization',
  'headers.cookie',
  'headers["cv-api-key"]',
  'headers["set-cookie"]',
  '*.apiKey',
  '*.keyRoot',
  '*.token',
  '*.idToken',
  '*.id_token',
  '*.access_token',
  '*.refresh_token',
  '*.logout_token',
  '*.email',
  '*.reason',
  'apiKey',
  'keyRoot',
  'token',
  'idToken',
  'id_token',
  'access_token',
  'refresh_token',
  'logout_token',
  'email',
  'reason'
]

type SerializedRequest = { method: string, url: string, remoteAddress?: string }

/**
 * A request's path as the router takes it, for the access line and the probes' exemption: without
 * its query, which may carry an authorization code (the sign-in callback), or a fragment (refused,
 * answers.ts, but logged); of an absolute-form target (`http://host/path`, which the router routes
 * by its path), the path alone, never the userinfo a client may have put before the host.
 */
export function pathOf (url: string): string {
  const path = url.charCodeAt(0) === 47 ? url : pathOfAbsoluteForm(url)
  const query = path.indexOf('?')
  const head = query === -1 ? path : path.slice(0, query)
  const fragment = head.indexOf('#')
  return fragment === -1 ? head : head.slice(0, fragment)
}

/** Scheme and authority, as find-my-way reads them (the authority ends at the first `/`, `?` or `#`). */
const SCHEME_AND_AUTHORITY = /^[A-Za-z][A-Za-z0-9+.-]*:\/\/[^/?#]*/

function pathOfAbsoluteForm (url: string): string {
  const rest = url.replace(SCHEME_AND_AUTHORITY, '')
  // Not absolute-form (`*`, or what the router refused as a bad URL): logged as it came.
  if (rest === url) return url
  return rest.charCodeAt(0) === 47 ? rest : `/${rest}`
}

export function loggerOptions (config: Config, stream?: DestinationStream): NonNullable<FastifyServerOptions['logger']> {
  return {
    level: config.logLevel,
    ...(stream === undefined ? {} : { stream }),
    redact: { paths: REDACT_PATHS, censor: '[redacted]' },
    serializers: {
      req: function serializeRequest (request: { method: string, url: string, ip?: string }): SerializedRequest {
        return { method: request.method, url: pathOf(request.url), remoteAddress: request.ip }
      },
      res: function serializeReply (reply: { statusCode: number }) {
        return { statusCode: reply.statusCode }
      }
    }
  }
}

type LogMethod = (...args: unknown[]) => void
type Level = 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent'

/**
 * `request.log`, made when the request first logs. Fastify makes a pino child per request, whose
 * bindings (the request id) pass the redaction paths, and most requests never log through it:
 * their one line is the access line, written by its own logger. This stands in for the child
 * until something is logged, then hands every call to the real child.
 */
class DeferredChildLogger {
  readonly #parent: FastifyBaseLogger
  readonly #bindings: Bindings
  readonly #options: ChildLoggerOptions
  #child: FastifyBaseLogger | null = null

  constructor (parent: FastifyBaseLogger, bindings: Bindings, options: ChildLoggerOptions) {
    this.#parent = parent
    this.#bindings = bindings
    this.#options = options
  }

  #logger (): FastifyBaseLogger {
    this.#child ??= this.#parent.child(this.#bindings, this.#options)
    return this.#child
  }

  #log (level: Level, args: unknown[]): void {
    (this.#logger()[level] as LogMethod)(...args)
  }

  get level (): string { return this.#child?.level ?? this.#options.level ?? this.#parent.level }
  set level (level: string) { this.#logger().level = level }
  fatal (...args: unknown[]): void { this.#log('fatal', args) }
  error (...args: unknown[]): void { this.#log('error', args) }
  warn (...args: unknown[]): void { this.#log('warn', args) }
  info (...args: unknown[]): void { this.#log('info', args) }
  debug (...args: unknown[]): void { this.#log('debug', args) }
  trace (...args: unknown[]): void { this.#log('trace', args) }
  silent (...args: unknown[]): void { this.#log('silent', args) }
  child (bindings: Bindings, options?: ChildLoggerOptions): FastifyBaseLogger { return this.#logger().child(bindings, options) }
}

/** Fastify's `childLoggerFactory` (app.ts): a deferred child per request. */
export function deferredChildLogger (logger: FastifyBaseLogger, bindings: Bindings, options: ChildLoggerOptions): FastifyBaseLogger {
  return new DeferredChildLogger(logger, bindings, options) as unknown as FastifyBaseLogger
}

declare module 'fastify' {
  interface FastifyRequest {
    /** Keyed hash of the signed-in patient (never the email), set with the session. */
    patient: string | null
    /** The audit record of this request, when its route keeps one: written in its access line. */
    audit: object | null
  }
}

/**
 * One access line per answered request, instead of Fastify's two (`incoming request` and
 * `request completed`, turned off in app.ts): the request, the status, the contract code of an
 * error answer, the time taken, the patient's keyed hash and, on an audited route, the audit
 * record. A third of the CPU a cancel cost went into its three log lines. A request whose body
 * Node's HTTP parser refused while its route served it has this line too, its only one, with the
 * answer written on its socket and the parser's error code (`parserError`, as the parser's own line
 * for a request no route took: answers.ts).
 *
 * The line is built field by field from values that cannot carry a secret: the method, the path
 * without its query, the client address, the status, a contract code, a duration, a keyed hash
 * and the audit record, which holds no email and no reason (test/security/log-capture.test.ts
 * scans every line of a whole flow for them). So it is written by a logger made once without the
 * redaction paths, whose wildcards cost half of a line's time; every other line keeps them.
 *
 * Written after the route's own onResponse hooks (the cancel route's audit fills `request.audit`
 * in its own), see afterEveryAnswer.
 */
async function accessLog (app: FastifyInstance): Promise<void> {
  app.decorateRequest('patient', null)
  app.decorateRequest('audit', null)
  const lines = app.log.child({}, { redact: [] })
  // The audit record is the cancel's trail, not a debugging aid: a LOG_LEVEL above info (warn, to
  // cut the access lines) keeps it. Only `silent` drops it with every other line.
  const auditLines = app.log.level === 'silent' ? lines : app.log.child({}, { redact: [], level: 'info' })
  function logAnswer (request: FastifyRequest, reply: FastifyReply, done: HookHandlerDoneFunction): void {
    const out = request.audit === null ? lines : auditLines
    out.info({
      reqId: request.id,
      req: request,
      res: reply,
      code: reply.errorCode ?? undefined,
      // Looked up for error answers only: a request answered as usual pays a null check.
      parserError: reply.errorCode === null ? undefined : socketAnswerOf(request.raw)?.parserError,
      responseTime: reply.elapsedTime,
      patient: request.patient ?? undefined,
      audit: request.audit ?? undefined
    }, 'request completed')
    done()
  }
  afterEveryAnswer(app, () => logAnswer, logAnswer)
}

export const accessLogPlugin = fp(accessLog, { name: 'access-log', fastify: '5.x', dependencies: ['answers'] })
