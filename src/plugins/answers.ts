import { randomUUID } from 'node:crypto'
import { STATUS_CODES, type IncomingMessage, type ServerResponse } from 'node:http'
import { isIPv6, type Socket } from 'node:net'
import { Readable, type Duplex } from 'node:stream'
import fp from 'fastify-plugin'
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest, HookHandlerDoneFunction, HTTPMethods, preParsingHookHandler } from 'fastify'
import { performance } from 'node:perf_hooks'
import { ApiError, ErrorCode, errorEnvelope, OwnError, type ErrorEnvelope } from '../errors.js'
import { RepeatedWarnings } from '../state/notice.js'
import { answeredOutsideFastify, appendHook } from './after-answer.js'
import { answerOptions, applyCors, SECURITY_HEADERS } from '../web/security.js'
import { holdRetryAfterPastSpentWindows } from '../limits/headers.js'

/**
 * Every answer in the contract's envelope, with `x-request-id` and `cache-control: no-store`:
 * route answers, Fastify's own errors (validation, body parsing, 404) and the HTTP parser's errors
 * that never reach a route.
 */

const REQUEST_ID = /^[A-Za-z0-9._:-]{1,128}$/

/** Fastify's `genReqId`: the caller's id when it is well-formed, else a new one. */
export function requestIdFor (req: IncomingMessage): string {
  const given = req.headers['x-request-id']
  return typeof given === 'string' && REQUEST_ID.test(given) ? given : randomUUID()
}

/** Fastify's own error codes that are the client's fault, mapped to the contract's codes. */
const FASTIFY_CODES: Record<string, [number, ErrorCode, string]> = {
  FST_ERR_CTP_BODY_TOO_LARGE: [413, ErrorCode.PAYLOAD_TOO_LARGE, 'Request body is too large'],
  FST_ERR_CTP_INVALID_MEDIA_TYPE: [415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, 'Request body must be application/json'],
  FST_ERR_CTP_INVALID_CONTENT_LENGTH: [400, ErrorCode.VALIDATION_FAILED, 'Content-Length does not match the body'],
  FST_ERR_CTP_INVALID_JSON_BODY: [400, ErrorCode.VALIDATION_FAILED, 'Request body is not valid JSON'],
  FST_ERR_CTP_EMPTY_JSON_BODY: [400, ErrorCode.VALIDATION_FAILED, 'Request body is not valid JSON']
}

export function toApiError (error: FastifyError | ApiError | Error): ApiError | null {
  if (error instanceof ApiError) return error
  const fastifyError = error as FastifyError
  if (fastifyError.validation !== undefined) {
    return new ApiError(400, ErrorCode.VALIDATION_FAILED, validationMessage(fastifyError), { cause: error })
  }
  const known = fastifyError.code === undefined ? undefined : FASTIFY_CODES[fastifyError.code]
  if (known !== undefined) return new ApiError(known[0], known[1], known[2], { cause: error })
  const status = fastifyError.statusCode
  if (status !== undefined && status >= 400 && status < 500) {
    return new ApiError(status, status === 404 ? ErrorCode.NOT_FOUND : ErrorCode.VALIDATION_FAILED, 'Bad request', { cause: error })
  }
  return null
}

function validationMessage (error: FastifyError): string {
  // Ajv's messages name the field and the rule, never the value: safe to show and to log.
  const first = error.validation?.[0]
  if (first === undefined) return 'Request is invalid'
  const where = `${error.validationContext ?? 'request'}${first.instancePath.replace(/\//g, '.')}`
  if (first.keyword === 'additionalProperties') {
    const extra = (first.params as { additionalProperty?: string }).additionalProperty
    return `${where} must not have the property ${JSON.stringify(extra).slice(0, 64)}`
  }
  // Ajv quotes the regular expression for a pattern; a sentence serves clients better.
  if (first.keyword === 'pattern') return `${where} is not in the expected format`
  return `${where} ${first.message ?? 'is invalid'}`
}

export function sendError (reply: FastifyReply, error: ApiError): FastifyReply {
  reply.errorCode = error.code
  for (const [name, value] of Object.entries(error.headers)) reply.header(name, value)
  if (error.statusCode === 429 || error.statusCode === 503) holdRetryAfterPastSpentWindows(reply)
  return reply.code(error.statusCode).send(error.toEnvelope())
}

const INTERNAL: ErrorEnvelope = errorEnvelope(500, ErrorCode.INTERNAL_ERROR, 'Internal Server Error')

declare module 'fastify' {
  interface FastifyReply {
    /** The contract code of an error answer, for the audit record and metrics. */
    errorCode: ErrorCode | null
  }
  interface FastifyInstance {
    /**
     * The warnings each request repeats while a dependency is down (RepeatedWarnings): once a
     * minute per message, with the count of those left out.
     */
    repeatedWarnings: RepeatedWarnings
  }
}

/** The headers every answer carries, on both listeners: the request's id, and no caching of anything. */
export function stampHeaders (request: FastifyRequest, reply: FastifyReply): void {
  reply.header('x-request-id', request.id).header('cache-control', 'no-store')
}

/** Whether the request's header lines (name, value, name, value...) name Host more than once. */
function hasTwoHosts (raw: string[]): boolean {
  let seen = false
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i] as string
    if (name.length === 4 && name.toLowerCase() === 'host') {
      if (seen) return true
      seen = true
    }
  }
  return false
}

/**
 * Connections closing after an answer (a refusal: faulty framing, a 501, a Host check; or, while
 * draining, the answer to the last request read on the connection, app.ts): Node writes no answer
 * behind the one that closes them, but still hands a request read behind it to its route; none may
 * be acted on.
 */
const closingConnections = new WeakSet<Socket>()

/** The answer being sent on `socket` closes it: a request read behind it is refused unanswered. */
export function closesAfterThisAnswer (socket: Socket): void {
  closingConnections.add(socket)
}

/** The requests refused by refusalBeforeRouting for their framing or Host: their answers close. */
const refusedForFraming = new WeakSet<IncomingMessage>()

/** Whether this request was refused before routing in a way that closes its connection. */
export function isRefusedForFraming (request: IncomingMessage): boolean {
  return refusedForFraming.has(request)
}

/**
 * Why a request is refused before anything else runs, on either listener; null when it is not.
 * The refusal of faulty framing says `Connection: close` and marks its connection closing: a
 * connection already closing serves nothing behind it.
 * Transfer-Encoding that Node's parser takes but that this service must not (RFC 9112, 6.1): in an
 * HTTP/1.0 request the field does not exist, and a hop in front frames the body otherwise (faulty
 * framing: 400); a coding other than chunked is not decoded here (501), rather than its bytes read
 * as the JSON. HTTP/1.1 requires Host, and no request may carry two, or one whose value is no
 * host (RFC 9112, 3.2: each a 400).
 * Node's own refusal of the first (requireHostHeader, off in listener.ts) is a bare 400 without the
 * envelope or these headers; Node keeps the first of two and says nothing. The service never reads
 * Host (its URLs come from PUBLIC_URL), but a proxy in front that read the other one would see
 * another request than this one.
 */
export function refusalBeforeRouting (request: FastifyRequest): ApiError | null {
  const refusal = earlyRefusal(request)
  if (refusal !== null) {
    closesAfterThisAnswer(request.raw.socket)
    refusedForFraming.add(request.raw)
    return refusal
  }
  // A fragment is no part of a request target (RFC 9112, 3.2), and Node's parser lets one through:
  // the router would drop it and route `/appointments#x` as `/appointments`, which a rule in front
  // matching the whole path would not see as that path (Envoy refuses these too). Its framing
  // held: the connection stays.
  return (request.raw.url as string).includes('#') ? fragmentRefused() : null
}

function fragmentRefused (): ApiError {
  return new ApiError(400, ErrorCode.VALIDATION_FAILED, 'Malformed request URL')
}

function earlyRefusal (request: FastifyRequest): ApiError | null {
  const { raw } = request
  const te = request.headers['transfer-encoding']
  if (closingConnections.has(raw.socket)) return closing(400, 'The connection is closing after the answer before')
  // Node before 22.23.2 and 24.18.1 (CVE-2026-58044; 20, which this service still runs on, has no
  // fix) drops the fields past maxHeadersCount (1000 by default) from the request, while its parser
  // still frames the body by them: a Transfer-Encoding among those would escape every check below.
  // A patched Node answers such a request 431 itself; this is the same answer on the others.
  if (raw.rawHeaders.length >= MAX_RAW_HEADER_ENTRIES) return closing(431, 'Request headers are too large')
  if (te !== undefined && raw.httpVersion === '1.0') return closing(400, 'Transfer-Encoding is not HTTP/1.0')
  if (te !== undefined && te.trim().toLowerCase() !== 'chunked') return closing(501, 'Only the chunked transfer coding is supported')
  const host = raw.headers.host
  if (host === undefined) return raw.httpVersion === '1.1' ? closing(400, 'Host header required') : null
  if (hasTwoHosts(raw.rawHeaders)) return closing(400, 'Only one Host header is allowed')
  return isHost(host) ? null : closing(400, 'Invalid Host header')
}

/**
 * A Host field's value: `uri-host [ ":" port ]` (RFC 9112, 3.2; RFC 3986, 3.2.2), an IP literal in
 * brackets (IP_LITERAL) or a reg-name (empty for a target without authority), whose `%` begins a
 * pct-encoded octet. Node's parser has refused control characters already; this refuses a space,
 * `@` (userinfo), `/` and other text no host has. The brackets' content is group 1.
 */
const HOST_VALUE = /^(?:\[([^\]]*)\]|(?:[0-9A-Za-z._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?$/

/**
 * An IP literal's content: IPvFuture (its `v` either case, as ABNF strings are), or an IPv6 address (group 1, checked by isIPv6) with a zone
 * (RFC 6874, `[fe80::1%25eth0]`, or with the bare `%` Node's own client writes, `[fe80::1%eth0]`).
 */
const IP_LITERAL = /^(?:[vV][0-9A-Fa-f]+\.[0-9A-Za-z._~!$&'()*+,;=:-]+|([0-9A-Fa-f:.]+)(?:%(?:25)?(?:[0-9A-Za-z._~-]|%[0-9A-Fa-f]{2})+)?)$/

function isHost (value: string): boolean {
  const host = HOST_VALUE.exec(value)
  if (host === null) return false
  if (host[1] === undefined) return true
  const literal = IP_LITERAL.exec(host[1])
  if (literal === null) return false
  return literal[1] === undefined || isIPv6(literal[1])
}

/** rawHeaders' length at Node's default maxHeadersCount: 1000 fields, a name and a value each. */
const MAX_RAW_HEADER_ENTRIES = 2000

function closing (status: 400 | 431 | 501, message: string): ApiError {
  return new ApiError(status, ErrorCode.VALIDATION_FAILED, message, { headers: { connection: 'close' } })
}

/** How often a warning that every request repeats is written again (ms). */
const REPEATED_WARNING_EVERY_MS = 60_000

async function answers (app: FastifyInstance): Promise<void> {
  app.decorateReply('errorCode', null)
  app.decorate('repeatedWarnings', new RepeatedWarnings(REPEATED_WARNING_EVERY_MS, () => performance.now()))
  app.addHook('onRequest', function stampAnswer (request: FastifyRequest, reply: FastifyReply, done: HookHandlerDoneFunction) {
    stampHeaders(request, reply)
    const refusal = refusalBeforeRouting(request)
    if (refusal !== null) {
      sendError(reply.headers(SECURITY_HEADERS), refusal)
      return
    }
    done()
  })

  // JSON only: Fastify's default text/plain parser would let a CSRF-friendly "simple" content
  // type through to the routes.
  app.removeContentTypeParser('text/plain')

  // "No body at all is fine": an empty application/json body is treated as no body, so clients
  // that always send the header are not refused for it.
  app.removeContentTypeParser('application/json')
  // Fastify's own parser keeps its prototype-poisoning protection.
  const parseJsonStrict = app.getDefaultJsonParser('error', 'error')
  // Any other type: refused (415), unless there is no body at all (`Content-Length: 0`, which
  // curl's `-d ''` and fetch's `body: ''` send with a form or text type): no body is fine.
  app.addContentTypeParser('*', function emptyBodyOnly (request, _payload, done) {
    if (hasNoBody(request)) done(null, undefined)
    else done(notJson(), undefined)
  })
  app.addContentTypeParser('application/json', { parseAs: 'buffer' }, function parseJson (request, bytes, done) {
    if (!isUtf8Json(request.headers['content-type'] as string)) { done(notUtf8(), undefined); return }
    if (isEncoded(request.headers['content-encoding'])) { done(encodedBody(), undefined); return }
    // Bytes that are not UTF-8 (a Latin-1 client sending no charset) are refused, never read with
    // U+FFFD in their place. A BOM is dropped, as before.
    let body: string
    try {
      body = UTF8.decode(bytes as Buffer)
    } catch {
      done(notUtf8(), undefined)
      return
    }
    if (body.trim() === '') { done(null, undefined); return }
    parseJsonStrict(request, body, done)
  })

  app.setErrorHandler(function handleError (error: FastifyError, request, reply) {
    // A body broken or too slow to arrive was answered on its socket already (answerParserError):
    // its route then fails to read it, here as any body cut off (a 400 that never goes out, whose
    // hooks report the answer written; after-answer.ts).
    const apiError = toApiError(error)
    // No route: whatever its body (malformed, too large, of another type: Fastify parses it before
    // the not-found handler runs), the answer is the contract's 404. Only the body's errors: a
    // refusal decided before it (the per-IP limit's 429) stands.
    if (request.is404 && apiError !== null && BODY_ERRORS.has(apiError.statusCode)) return notFound(request, reply)
    if (apiError === null) {
      request.log.error({ err: error }, 'unhandled error')
      reply.errorCode = ErrorCode.INTERNAL_ERROR
      return reply.code(500).send(INTERNAL)
    }
    if (apiError.statusCode >= 500) {
      const fields = { err: { code: apiError.code, ...upstreamFields(apiError), cause: causeSummary(apiError.cause) } }
      // The org key refused is the operator's to mend, at once: an error, where an upstream's own
      // failure (it comes and goes) is a warning, one per failed call (the org budget bounds
      // them). A store or the identity provider unreachable would be a line per request: those
      // are written once a minute each, with the count of the others.
      if (apiError.code === ErrorCode.SERVICE_UNAVAILABLE) app.repeatedWarnings.warn(request.log, fields, apiError.message)
      // One per call, not per request: the followers of a key-less single flight are thrown the
      // error of the call they waited on, the same object, and their access lines and audit
      // records say they shared it.
      else if (!loggedCallFailures.has(apiError)) {
        loggedCallFailures.add(apiError)
        if (apiError.code === ErrorCode.UPSTREAM_AUTH_FAILED) request.log.error(fields, apiError.message)
        else request.log.warn(fields, apiError.message)
      }
    }
    return sendError(reply, apiError)
  })

  app.setNotFoundHandler(notFound)
}

// The BOM is kept: secure-json-parse drops one, as it did when the body was read as a string (a
// second is not JSON).
const UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true })

/** The statuses of a body's errors: malformed, too large, of a type or coding not accepted. */
const BODY_ERRORS: ReadonlySet<number> = new Set([400, 413, 415])

function notFound (request: FastifyRequest, reply: FastifyReply): FastifyReply {
  reply.errorCode = ErrorCode.NOT_FOUND
  return reply.code(404).send(errorEnvelope(404, ErrorCode.NOT_FOUND, noRouteMessage(request)))
}

/** The 404's message: the method and the path without its query, capped (the metrics listener's too). */
export function noRouteMessage (request: FastifyRequest): string {
  return `No route ${request.method} ${(request.url.split('?', 1)[0] as string).slice(0, 200)}`
}

/**
 * JSON is UTF-8 (RFC 8259, 8.1), and the body is read as UTF-8: a `charset` parameter naming
 * anything else (`iso-8859-1`) is refused rather than its text silently changed.
 */
function isUtf8Json (contentType: string): boolean {
  if (contentType.length <= 'application/json'.length) return true
  const charset = /;\s*charset\s*=\s*"?([^";\s]*)/i.exec(contentType)?.[1]
  // US-ASCII is UTF-8 too.
  return charset === undefined || /^(utf-?8|us-ascii)?$/i.test(charset)
}

/** `Content-Length: 0`, or neither a length nor a chunked coding (RFC 9112, 6.3: no body). */
function hasNoBody (request: FastifyRequest): boolean {
  const length = request.headers['content-length']
  return length === '0' || (length === undefined && request.headers['transfer-encoding'] === undefined)
}

function notJson (): ApiError {
  return new ApiError(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, 'Request body must be application/json')
}

function notUtf8 (): ApiError {
  return new ApiError(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, 'Request body must be JSON in UTF-8')
}

/**
 * Whether a body arrives in a content coding (gzip, br...): none is decoded here, so it is refused
 * as unsupported (RFC 9110, 15.5.16) rather than parsed as if it were plain JSON.
 */
function isEncoded (contentEncoding: string | undefined): boolean {
  return contentEncoding !== undefined && contentEncoding.trim().toLowerCase() !== 'identity'
}

function encodedBody (): ApiError {
  return new ApiError(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, 'Request body must not be content-encoded (gzip and the like are not accepted)')
}

/** The upstream's status and what became of the call, when the error is the Care360 client's. */
function upstreamFields (error: ApiError): { upstreamStatus?: number | null, outcome?: string } {
  const { upstreamStatus, outcome } = error as { upstreamStatus?: number | null, outcome?: string }
  return outcome === undefined ? {} : { upstreamStatus, outcome }
}

interface CauseSummary { name: string, code?: string, message?: string, cause?: CauseSummary }

/**
 * A cause and the causes under it (a few levels: fetch's "fetch failed" says little, the
 * ECONNREFUSED under it says what to mend), each by name and code; the message only of our own
 * errors (OwnError), never of others, which may carry a store's or the upstream's words.
 */
export function causeSummary (cause: unknown, depth = 3): CauseSummary | undefined {
  if (!(cause instanceof Error) || depth === 0) return undefined
  const summary: CauseSummary = { name: cause.name }
  const code = (cause as NodeJS.ErrnoException).code
  if (typeof code === 'string') summary.code = code
  if (cause instanceof OwnError) summary.message = cause.message
  const under = causeSummary(cause.cause, depth - 1)
  if (under !== undefined) summary.cause = under
  return summary
}

export const answersPlugin = fp(answers, { name: 'answers', fastify: '5.x' })

/**
 * Fastify's own answers before routing (a malformed percent-encoding in the URL, a path parameter
 * over maxParamLength) bypass the hooks: here they get the envelope and the two headers too. The
 * path is not echoed (it is the client's text).
 */
export function frameworkErrorAnswer (error: FastifyError, request: FastifyRequest, reply: FastifyReply): void {
  // Nor the draining one (app.ts, drainOnClose): the last request read on its connection.
  if (request.server.draining) {
    reply.header('connection', 'close')
    closesAfterThisAnswer(request.raw.socket)
  }
  // A web app's script reads this 400 as any other answer, and its browser's preflight for such a
  // path (an OPTIONS request asks nothing of the path) is answered as any other: a bare 204 with
  // the grant of an allowed origin (web/security.ts).
  if (applyCors(request, reply, request.server.config.corsOrigins)) {
    // Before routing: no hook runs, so the access line is written here.
    request.log.info({ req: request, res: { statusCode: 204 } }, 'request refused before routing')
    answerOptions(reply.headers(SECURITY_HEADERS).header('x-request-id', request.id).header('cache-control', 'no-store'))
    request.server.metrics.recordRefusedBeforeRouting(204)
    return
  }
  const code = ErrorCode.VALIDATION_FAILED
  reply.errorCode = code
  request.log.info({ req: request, res: { statusCode: 400 }, code }, 'request refused before routing')
  frameworkRefusal(error, request, reply)
  // And its count (afterEveryAnswer's hooks do not run either).
  request.server.metrics.recordRefusedBeforeRouting(400)
}

/** The answer itself, in the envelope with the two headers (the metrics listener's too). */
export function frameworkRefusal (error: FastifyError, request: FastifyRequest, reply: FastifyReply): void {
  const tooLong = error.code === 'FST_ERR_MAX_PARAM_LENGTH'
  reply.code(400).headers(SECURITY_HEADERS).header('x-request-id', request.id).header('cache-control', 'no-store')
    .send(errorEnvelope(400, ErrorCode.VALIDATION_FAILED, tooLong ? 'A path parameter is too long' : 'Malformed request URL'))
}

/**
 * An error answer written outside Fastify (its hooks never run): the envelope, with the two
 * headers, on a connection that closes after it.
 */
function closingAnswer (status: number, message: string, requestId: string): { body: string, headers: Record<string, string> } {
  const body = JSON.stringify(errorEnvelope(status, ErrorCode.VALIDATION_FAILED, message))
  return {
    body,
    headers: {
      ...SECURITY_HEADERS,
      // Node adds it to the answers it writes (417), not to those written on the socket.
      date: new Date().toUTCString(),
      'content-type': 'application/json; charset=utf-8',
      'content-length': String(Buffer.byteLength(body)),
      'cache-control': 'no-store',
      'x-request-id': requestId,
      connection: 'close'
    }
  }
}

/**
 * An `Expect` other than `100-continue` (Node's `checkExpectation` event): 417 in the envelope,
 * with the two headers, where Node would answer a bare 417.
 */
export function expectationFailedAnswer (this: FastifyInstance, request: IncomingMessage, response: ServerResponse): void {
  const id = requestIdFor(request)
  // Its access line and its count: Fastify never sees the request.
  this.log.info({ reqId: id, remoteAddress: request.socket.remoteAddress, res: { statusCode: 417 }, code: ErrorCode.VALIDATION_FAILED }, 'request refused: unsupported Expect')
  this.metrics.recordRefusedBeforeRouting(417)
  writeExpectationFailed(request, response, id)
}

/** The 417 itself, in the envelope with the two headers (the metrics listener's too). */
export function writeExpectationFailed (request: IncomingMessage, response: ServerResponse, id = requestIdFor(request)): void {
  const { body, headers } = closingAnswer(417, 'Unsupported Expect header', id)
  closesAfterThisAnswer(request.socket)
  response.writeHead(417, headers)
  response.end(body)
}

/** The methods whose requests carry a body here. */
const BODY_METHODS = new Set(['POST', 'PUT', 'PATCH'])

/**
 * `Expect: 100-continue` (RFC 9110, 10.1.1). Node invites the body with `100 Continue` as the
 * request arrives, before any hook or route: a body over its route's limit, or a request the per-IP
 * limit or the session check refused, was invited, sent, and then refused. Here the invitation
 * waits until the request has passed its onRequest hooks, and goes only to a body its route takes
 * (by its Content-Length; a chunked body is invited and held to the limit as it arrives). Any
 * other answer is given without it, and Node then closes the connection, the body unread. A
 * request no route takes is invited at once, as Node would: Fastify reads its body before its 404.
 * The same hook fails a request whose connection closed before its body was read (inviteBody);
 * one without a body is served as usual.
 * Register it before any route.
 */
export function inviteBodiesWithinLimit (app: FastifyInstance): void {
  app.server.on('checkContinue', function holdContinue (request: IncomingMessage, response: ServerResponse) {
    if (app.findRoute({ method: request.method as HTTPMethods, url: request.url as string }) === null) response.writeContinue()
    else awaitingContinue.add(response)
    app.server.emit('request', request, response)
  })
  app.addHook('onRoute', function inviteBodyOf (route) {
    const methods = [route.method].flat()
    if (methods.some((method) => BODY_METHODS.has(method))) route.preParsing = appendHook(route.preParsing, inviteBody)
  })
}

/** The answers whose request expects 100 Continue, held back by holdContinue (Node's own decision). */
const awaitingContinue = new WeakSet<ServerResponse>()

const inviteBody: preParsingHookHandler = function inviteBody (request, reply, payload, done) {
  // Its connection closed while the hooks before this one ran (its client left, perhaps after the
  // HTTP parser refused its body): Node destroyed the request, and a stream destroyed tells a
  // reader that comes later nothing, so its body would be awaited for ever, the request left
  // without an answer, hooks, access line or audit record. It fails as a body cut off does. One
  // without a body (a logout; a cancel, whose body is optional) has none to lose: it runs to its
  // end, as any request whose client left does (after-answer.ts), from an empty body.
  if (request.raw.destroyed) {
    if (hasNoBody(request)) done(null, Readable.from([]))
    else done(bodyCutOff())
    return
  }
  if (awaitingContinue.delete(reply.raw) && !(Number(request.headers['content-length']) > request.routeOptions.bodyLimit)) {
    reply.raw.writeContinue()
  }
  done(null, payload)
}

/** A body cut off with its connection, as Node and Fastify report it to a route reading it (a 400). */
function bodyCutOff (): Error {
  return Object.assign(new Error('aborted'), { code: 'ECONNRESET', statusCode: 400 })
}

/**
 * A CONNECT request (a proxy's method, RFC 9110, 9.3.6): Node would end its connection without a
 * word when no listener takes it. 400 in the envelope, with its access line and its count.
 */
export function connectRefusedAnswer (this: FastifyInstance, request: IncomingMessage, socket: Duplex): void {
  const id = requestIdFor(request)
  this.log.info({ reqId: id, remoteAddress: request.socket.remoteAddress, res: { statusCode: 400 }, code: ErrorCode.VALIDATION_FAILED }, 'request refused: CONNECT')
  this.metrics.recordRefusedBeforeRouting(400)
  writeConnectRefused(request, socket, id)
}

/** The CONNECT's 400 itself (the metrics listener's too). */
export function writeConnectRefused (request: IncomingMessage, socket: Duplex, id = requestIdFor(request)): void {
  // Node took its own listeners (error, timeouts) off the socket it handed over: an error with
  // none would be uncaught (a client's reset), and a client that never ends its side would hold
  // it past every timeout. So errors are ours, and the connection ends once the answer is out.
  socket.on('error', () => {})
  socket.once('finish', () => { socket.destroy() })
  endWithError(socket, 400, 'CONNECT is not served: this is no proxy', id)
}

/**
 * A parser error's answer written on the socket itself, in the envelope with the two headers, on
 * a connection that closes after it.
 */
export function endWithError (socket: Duplex, status: number, message: string, id: string): void {
  const { body, headers } = closingAnswer(status, message, id)
  let head = `HTTP/1.1 ${status} ${STATUS_CODES[status] as string}\r\n`
  for (const [name, value] of Object.entries(headers)) head += `${name}: ${value}\r\n`
  socket.end(`${head}\r\n${body}`)
}

/**
 * The response of the request a connection is serving (Node's own `_httpMessage`), or none (null
 * or undefined) when no request of it got past its headers.
 */
export function pendingResponse (socket: Socket): ServerResponse | null | undefined {
  return (socket as Socket & { _httpMessage?: ServerResponse | null })._httpMessage
}

/** The latest request of each connection whose headers Node parsed, with its id. */
const lastRequest = new WeakMap<Socket, { req: IncomingMessage, id: string }>()

/**
 * Fastify's `genReqId`: the request's id (requestIdFor), and the request noted as its
 * connection's latest, so that a parser error in its body is answered as its own (clientErrorAnswer).
 */
export function identifyRequest (req: IncomingMessage): string {
  const id = requestIdFor(req)
  lastRequest.set(req.socket, { req, id })
  return id
}

/** Connections whose parser error is answered already, or will be once the request before it is. */
const answering = new WeakSet<Socket>()

/**
 * Node's HTTP parser errors (bad request line, oversized headers, a broken body, ...) never reach
 * Fastify's router; they are answered here, still in the envelope and with the two headers, and
 * one answer per request, in order:
 * - an error in the body of the request being served (or its body too slow: Node's 408) is that
 *   request's answer, with its id, unless a hook answered it before its body had arrived: then
 *   that answer goes out whole and the connection closes, with no second one;
 * - an error behind requests still being served (pipelined: its headers, or its body) waits for
 *   their answers (HTTP/1.1 answers in order: written now, it would be read as an earlier
 *   request's), with the pipelined request's id when its headers parsed;
 * - otherwise (a request whose headers never parsed), a new id.
 * Each has one access line: its route's when a route was serving it (answerParserError).
 */
export function clientErrorAnswer (this: FastifyInstance, error: NodeJS.ErrnoException, socket: Socket): void {
  // llhttp stays in its error state: Node reports every later chunk of the connection again.
  if (answering.has(socket)) return
  answering.add(socket)
  // The connection's latest request while its body is incomplete: the error is in that body.
  const last = lastRequest.get(socket)
  settleParserError(this, error, socket, last !== undefined && !last.req.complete ? last : null, null)
}

function settleParserError (app: FastifyInstance, error: NodeJS.ErrnoException, socket: Socket, broken: { req: IncomingMessage, id: string } | null, after: ServerResponse | null): void {
  if (!socket.writable) {
    socket.destroy()
    return
  }
  const pending = pendingResponse(socket)
  if (pending == null || pending === after) {
    // No answer pending: the broken request had its answer already (a hook refused it before its
    // body arrived), and a second would answer nothing the client asked; or no request parsed.
    if (broken === null) answerParserError(app, error, socket, randomUUID())
    else socket.end()
    return
  }
  if (pending.req === broken?.req && !pending.headersSent) {
    answerParserError(app, error, socket, broken.id, broken.req)
    return
  }
  // An answer goes first: one being written, the broken request's own (then the connection
  // closes), or one of a request before it (Node hands the connection to the next queued response
  // as it finishes, before this listener runs).
  pending.once('finish', () => {
    if (pending.req === broken?.req) socket.end()
    else settleParserError(app, error, socket, broken, pending)
  })
  pending.once('close', () => { if (!pending.writableFinished) socket.destroy() })
}

/** The failed calls' errors already written to the log (handleError). */
const loggedCallFailures = new WeakSet<ApiError>()

/** The HTTP parser's refusal of status `status`, in the envelope with that status's own message. */
export function endWithParserRefusal (socket: Socket, status: 400 | 408 | 431, id: string): void {
  endWithError(socket, status, status === 431 ? 'Request headers are too large' : status === 408 ? 'Request timed out' : 'Malformed request', id)
}

/** The status of the HTTP parser's refusal: headers too large, too slow to arrive, or malformed. */
export function parserErrorStatus (error: NodeJS.ErrnoException): 400 | 408 | 431 {
  return error.code === 'HPE_HEADER_OVERFLOW' ? 431 : error.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 408 : 400
}

/**
 * The parser's refusal, answered on the socket. `served`: the request whose body it refused, which
 * Fastify is serving. One request has one access line and one count: when a route took it, the
 * route's (it fails to read the body, then its hooks report this answer: after-answer.ts), with
 * the parser's error code; else (no request parsed, or one no route takes) the one written here.
 */
function answerParserError (app: FastifyInstance, error: NodeJS.ErrnoException, socket: Socket, id: string, served: IncomingMessage | null = null): void {
  const status = parserErrorStatus(error)
  if (served !== null && app.findRoute({ method: served.method as HTTPMethods, url: served.url as string }) !== null) {
    answeredOutsideFastify(served, { statusCode: status, errorCode: ErrorCode.VALIDATION_FAILED, parserError: error.code })
  } else {
    // Its access line: no route saw the request (its parser's error code only, no client text).
    app.log.info({ reqId: id, remoteAddress: socket.remoteAddress, res: { statusCode: status }, code: ErrorCode.VALIDATION_FAILED, parserError: error.code }, 'request refused by the HTTP parser')
    app.metrics.recordRefusedBeforeRouting(status)
  }
  endWithParserRefusal(socket, status, id)
}
