import fp from 'fastify-plugin'
import swagger from '@fastify/swagger'
import type { FastifyInstance, RouteOptions } from 'fastify'
import { PROBES } from './limits/plugins.js'
import { ErrorCode, ErrorEnvelope } from './errors.js'

/**
 * `GET /openapi.json`: the OpenAPI 3.1 document of every public route, generated from the route
 * schemas (@fastify/swagger). Registered before the routes, whose schemas it collects as they are
 * added. Routes say what they answer on success and on their own errors; what every route of a
 * kind can answer (the per-IP limit, a missing session, CSRF, the session store) is added here,
 * from the route's auth mode, so that no route has to repeat it and none can forget it.
 */

export const OPENAPI_PATH = '/openapi.json'

/** What each error status means, in the contract's codes: the descriptions clients read. */
const CODES_BY_STATUS: Record<number, Array<[ErrorCode, string]>> = {
  400: [[ErrorCode.VALIDATION_FAILED, 'body, params or headers invalid, or the request could not be parsed'], [ErrorCode.UPSTREAM_REJECTED, 'Care360 refused the request (its 400; its `message`/`error` passed through, capped)']],
  401: [[ErrorCode.SESSION_REQUIRED, 'no valid session (missing, unknown or expired; or an ID token that fails the checks)']],
  403: [[ErrorCode.CSRF_REJECTED, 'cookie session: a state-changing request without `X-CSRF: 1`, from an origin not in CORS_ORIGINS, or sent cross-site (`Sec-Fetch-Site: cross-site`); a GET or HEAD another origin\'s page embedded (`Sec-Fetch-Site` same-site or cross-site with `Sec-Fetch-Mode: no-cors`, or a navigation to other than a document), navigated to by a same-site page without its user (no `Sec-Fetch-User: ?1`), or sent from an origin not in CORS_ORIGINS, or a prefetch (`Sec-Purpose: prefetch`)']],
  404: [[ErrorCode.APPOINTMENT_NOT_FOUND, "not one of the patient's own upcoming appointments, or unknown"], [ErrorCode.NOT_FOUND, 'no such route']],
  409: [[ErrorCode.IDEMPOTENCY_IN_FLIGHT, 'the first request with this Idempotency-Key is still running (or this one held the key too long to send its cancel: nothing was sent)']],
  413: [[ErrorCode.PAYLOAD_TOO_LARGE, 'body too large']],
  415: [[ErrorCode.UNSUPPORTED_MEDIA_TYPE, 'body is not JSON (on the back-channel logout: neither a form nor JSON)']],
  422: [[ErrorCode.IDEMPOTENCY_MISMATCH, 'Idempotency-Key reused with another appointment or reason']],
  429: [[ErrorCode.RATE_LIMITED, 'per-IP, per-session or per-session cancel limit'], [ErrorCode.UPSTREAM_RATE_LIMITED, 'org-wide Care360 budget spent, or Care360 cooling down after its own 429']],
  500: [[ErrorCode.INTERNAL_ERROR, 'a bug of ours; the body carries no details']],
  502: [[ErrorCode.UPSTREAM_AUTH_FAILED, 'Care360 refused the organization key (an operator problem)'], [ErrorCode.UPSTREAM_ERROR, 'Care360 5xx, unexpected status or body, or connection lost after sending'], [ErrorCode.UPSTREAM_UNAVAILABLE, 'Care360 unreachable: the request was never sent']],
  503: [[ErrorCode.SERVICE_UNAVAILABLE, 'session store or identity provider unreachable; on the cancel, the Idempotency-Key store unreachable or full, or, without a key, a replica shutting down that hands the cancel back (with `Retry-After`)']],
  504: [[ErrorCode.UPSTREAM_TIMEOUT, 'Care360 slower than CV_TIMEOUT_MS']]
}

/** Codes a route of this path can answer with, where the contract narrows them down. */
function codesFor (status: number, url: string): Array<[ErrorCode, string]> {
  const all = CODES_BY_STATUS[status]
  /* c8 ignore next -- a route declaring a status the table lacks; test/openapi.test.ts fails on it */
  if (all === undefined) return []
  if (status === 404) return all.filter(([code]) => (url === '/appointments/:id/cancel') === (code === ErrorCode.APPOINTMENT_NOT_FOUND))
  if (status === 429 && !url.startsWith('/appointments')) return all.filter(([code]) => code === ErrorCode.RATE_LIMITED)
  if (status === 400 && !url.startsWith('/appointments')) return all.filter(([code]) => code !== ErrorCode.UPSTREAM_REJECTED)
  return all
}

const RETRY_AFTER = { type: 'integer', minimum: 0, description: 'Seconds to wait before trying again' }

/** One error answer: the shared envelope, its codes listed in the description and as an enum. */
function errorAnswer (status: number, url: string): Record<string, unknown> {
  const codes = codesFor(status, url)
  const answer: Record<string, unknown> = {
    description: codes.map(([code, why]) => `\`${code}\`: ${why}`).join('; '),
    allOf: [
      { $ref: '#/components/schemas/ErrorEnvelope' },
      { type: 'object', properties: { code: { type: 'string', enum: codes.map(([code]) => code) } } }
    ]
  }
  // The per-client limits, the upstream's cooldown and the org budget (429); an Idempotency-Key, or
  // an identical cancel, still in flight (409); the session store, the identity provider or the
  // idempotency store unreachable (503). The RateLimit fields: answerHeaders.
  if (status === 429 || status === 409 || status === 503) answer.headers = { 'retry-after': RETRY_AFTER }
  return answer
}

/**
 * The one error answer with data of its own: `POST /auth/logout` with a session cookie whose
 * session had ended (routes/auth.ts). Not the shared envelope, which allows no other field.
 */
function endedSignOut (): Record<string, unknown> {
  return {
    description: `\`${ErrorCode.SESSION_REQUIRED}\`: no valid session. With a session cookie whose session had ended, the cookie is cleared and \`data.endSessionUrl\` (when the provider has one) is where to send the browser to end the identity provider's session too`,
    type: 'object',
    required: ['status', 'success', 'message', 'code'],
    additionalProperties: false,
    properties: {
      status: { type: 'integer' },
      success: { type: 'boolean', enum: [false] },
      message: { type: 'string' },
      code: { type: 'string', enum: [ErrorCode.SESSION_REQUIRED] },
      data: { type: 'object', additionalProperties: false, properties: { endSessionUrl: { type: 'string' } } }
    }
  }
}

type AuthMode = 'required' | 'optional' | undefined

/** Error statuses every route of this kind can answer, beyond those it declares itself. */
function implicitErrors (route: RouteOptions, auth: AuthMode): number[] {
  if ((route.config as { failsByRedirect?: boolean } | undefined)?.failsByRedirect === true) return []
  const methods = ([] as string[]).concat(route.method)
  const changesState = methods.some((method) => !['GET', 'HEAD', 'OPTIONS'].includes(method))
  // The per-IP limit applies to every route but the probes (no 429, no RateLimit fields), before anything else.
  const statuses = PROBES.has(route.url) ? [] : [429]
  if (auth === 'required') statuses.push(401)
  if (auth !== undefined) statuses.push(503)
  // CSRF applies to every request a session cookie authenticates: state-changing ones fully, safe
  // ones when another origin's page embedded them (web/csrf.ts).
  if (auth !== undefined) statuses.push(403)
  // A body is parsed on every state-changing route, whether it declares one or not (JSON, 8 KiB
  // unless the route sets its own limit; a form on the back-channel logout).
  if (changesState) statuses.push(400, 413, 415)
  // Query parameters or path parameters with a schema are validated too (GET /auth/me's `slide`).
  const schema = route.schema as { querystring?: unknown, params?: unknown } | undefined
  if (schema?.querystring !== undefined || schema?.params !== undefined) statuses.push(400)
  return statuses
}

const SESSION_SECURITY = [{ bearer: [] }, { cookie: [] }]

function isErrorEnvelope (schema: unknown): boolean {
  return typeof schema === 'object' && schema !== null && (schema as { $id?: unknown }).$id === (ErrorEnvelope as { $id?: string }).$id
}

/**
 * Per route: the security its auth mode implies, and every error answer described by its codes.
 * Returns copies: the schemas themselves also drive validation and serialization.
 */
function describeRoute ({ schema, url, route }: { schema: Record<string, unknown> | undefined, url: string, route: RouteOptions }): { schema: Record<string, unknown>, url: string } {
  const auth = (route.config as { auth?: AuthMode } | undefined)?.auth
  const response: Record<string, unknown> = { ...(schema?.response as Record<string, unknown> | undefined) }
  const declared = Object.keys(response).map(Number).filter((status) => status >= 400 && isErrorEnvelope(response[status]))
  for (const status of new Set([...declared, ...implicitErrors(route, auth)])) {
    if (response[status] === undefined || isErrorEnvelope(response[status])) response[status] = status === 401 && url === '/auth/logout' ? endedSignOut() : errorAnswer(status, url)
  }
  const security = auth === 'required' ? SESSION_SECURITY : auth === 'optional' ? [{}, ...SESSION_SECURITY] : []
  const described: Record<string, unknown> = { ...schema, response, security: schema?.security ?? security }
  const headers = requestHeaders(route, auth)
  if (schema?.headers === undefined && headers !== null) described.headers = headers
  return { schema: described, url }
}

/**
 * Request headers the hooks read rather than a route schema: `X-CSRF` on state-changing session
 * routes, `Idempotency-Key` on the cancel.
 */
function requestHeaders (route: RouteOptions, auth: AuthMode): Record<string, unknown> | null {
  const methods = ([] as string[]).concat(route.method)
  if (auth === undefined || methods.every((method) => ['GET', 'HEAD', 'OPTIONS'].includes(method))) return null
  const properties: Record<string, unknown> = {
    'x-csrf': { type: 'string', enum: ['1'], description: 'Required with cookie sessions (anti-forgery); not needed with a bearer token' }
  }
  if (route.url === '/appointments/:id/cancel') {
    properties['idempotency-key'] = {
      type: 'string',
      pattern: '^[\\x21-\\x7e]{1,255}$',
      description: 'Optional, 1 to 255 visible ASCII characters: the same key from the same patient within 24 h replays the first answer (422 with another body, 409 while the first is in flight)'
    }
  }
  return { type: 'object', properties }
}

/**
 * Answer headers shared by many answers, described once (`components.headers`) and referenced
 * from each answer that carries them.
 */
type SharedHeader = 'RequestId' | 'RateLimitPolicy' | 'RateLimit' | 'IdempotentReplayed'
const ANSWER_HEADERS: Record<SharedHeader, { description: string, required?: boolean, schema: { type: 'string', pattern?: string, enum?: string[] } }> = {
  RequestId: {
    description: "This request's id: the caller's `X-Request-Id` when it matches `^[A-Za-z0-9._:-]{1,128}$`, else one generated here. Sent on every answer, passed to Care360, and in our logs: quote it when reporting a problem",
    required: true,
    schema: { type: 'string', pattern: '^[A-Za-z0-9._:-]{1,128}$' }
  },
  RateLimitPolicy: {
    description: 'The per-client limits that applied to this request (draft-ietf-httpapi-ratelimit-headers-10), one item each, in order: `"ip"` (RATE_LIMIT_IP, every request but `/healthz` and `/readyz`; on the sign-out and back-channel logout routes it counts their refusals only), `"session"` (RATE_LIMIT_SESSION) when it came with a valid session, except on sign-out, `"cancel"` (RATE_LIMIT_CANCEL) on the cancel route; an item per limit up to the one that refused it, if one did. `q` is the quota, `w` the window in seconds, e.g. `"ip";q=300;w=60, "session";q=60;w=60`. On every answer except a request refused before routing (a malformed URL, a path parameter over 256 characters, HTTP/1.1 without Host, two Host fields, Transfer-Encoding in HTTP/1.0 or a coding other than chunked)',
    schema: { type: 'string' }
  },
  RateLimit: {
    description: 'What is left of each limit of `RateLimit-Policy`, in the same order (draft-ietf-httpapi-ratelimit-headers-10): `r` the requests remaining, `t` the seconds until its window resets, e.g. `"ip";r=299;t=60, "session";r=12;t=21`. Sent with `RateLimit-Policy`',
    schema: { type: 'string' }
  },
  IdempotentReplayed: {
    description: '`true` when this answer is the stored answer of an earlier cancel with the same Idempotency-Key, replayed without calling Care360 again (its status and body are the first answer\'s: a 200, or an error decided once the cancel could run: `UPSTREAM_REJECTED`, `APPOINTMENT_NOT_FOUND`, `UPSTREAM_AUTH_FAILED`, `UPSTREAM_ERROR`). Absent on any other answer',
    schema: { type: 'string', enum: ['true'] }
  }
}

const headerRef = (name: SharedHeader): { $ref: string } => ({ $ref: `#/components/headers/${name}` })

/** The cancel's answers an Idempotency-Key can replay: its 200, and the errors stored for the key (idempotency/settle.ts). */
const REPLAYED_CODES: ErrorCode[] = [ErrorCode.UPSTREAM_REJECTED, ErrorCode.APPOINTMENT_NOT_FOUND, ErrorCode.UPSTREAM_AUTH_FAILED, ErrorCode.UPSTREAM_ERROR]
const CANCEL_PATH = '/appointments/{id}/cancel'

function isReplayed (path: string, method: string, status: number): boolean {
  if (path !== CANCEL_PATH || method !== 'post') return false
  return status === 200 || codesFor(status, '/appointments/:id/cancel').some(([code]) => REPLAYED_CODES.includes(code))
}

/** The sign-in redirects' `Location`, and the `Retry-After` of the per-IP limit's refusal turned into one. */
const REDIRECT_HEADERS = {
  location: { description: 'Where the browser goes next: the identity provider, `returnTo` on the web app, or the web app with `signin_error=<reason>`', required: true, schema: { type: 'string', format: 'uri' } },
  'retry-after': { description: 'Only on a redirect with `signin_error=rate_limited`: seconds until the per-IP limit takes a new request', schema: { type: 'integer', minimum: 0 } }
}

/** Every 401's challenge (errors.ts, BEARER_CHALLENGE). */
const CHALLENGE = {
  'www-authenticate': { description: 'The challenge of every 401 (RFC 9110, 15.5.2): `Bearer`, the session token of `POST /auth/session` (RFC 6750), with `error="invalid_token"` when the request sent one and it was refused (unknown, expired, signed out); web sessions sign in again through `/auth/login`', required: true, schema: { type: 'string', enum: ['Bearer', 'Bearer error="invalid_token"'] } }
}

type Answer = { headers?: Record<string, unknown> }
type Paths = Record<string, Record<string, { responses?: Record<string, Answer>, requestBody?: { required?: boolean, content?: Record<string, { schema?: { required?: unknown[] } }> } }>>

/**
 * The headers the hooks write rather than a route: `x-request-id` (plugins/answers.ts) on every
 * answer, the RateLimit fields (limits/plugins.ts) on every answer of a limited route;
 * `idempotent-replayed` on the cancel's answers that can be replays; `Location` on redirects;
 * `WWW-Authenticate` on 401s.
 */
function answerHeaders (paths: Paths): void {
  for (const [path, operations] of Object.entries(paths)) {
    for (const [method, operation] of Object.entries(operations)) {
      // Every operation has its answers (test/openapi.test.ts requires a success on each).
      for (const [status, answer] of Object.entries(operation.responses as Record<string, Answer>)) {
        answer.headers = {
          ...answer.headers,
          ...(status === '302' ? REDIRECT_HEADERS : {}),
          ...(status === '401' ? CHALLENGE : {}),
          'x-request-id': headerRef('RequestId'),
          ...(PROBES.has(path) ? {} : { 'ratelimit-policy': headerRef('RateLimitPolicy'), ratelimit: headerRef('RateLimit') }),
          ...(isReplayed(path, method, Number(status)) ? { 'idempotent-replayed': headerRef('IdempotentReplayed') } : {})
        }
      }
    }
  }
}

/**
 * A JSON body whose every field is optional may be left out altogether (the cancel's reason):
 * the generator marks every request body required, the routes accept none.
 */
function optionalBodies (paths: Paths): void {
  for (const operations of Object.values(paths)) {
    for (const operation of Object.values(operations)) {
      const body = operation.requestBody
      const schema = body?.content?.['application/json']?.schema
      if (body !== undefined && schema !== undefined && (schema.required ?? []).length === 0) body.required = false
    }
  }
}

/** The whole document, once generated: what no single route's schema can say. */
function finishDocument ({ openapiObject }: { openapiObject: Record<string, unknown> }): Record<string, unknown> {
  const paths = openapiObject.paths as Paths
  optionalBodies(paths)
  answerHeaders(paths)
  return openapiObject
}

/** The shared envelope as a plain JSON Schema: no `$id` (the component's name is its id). */
function errorEnvelopeComponent (): Record<string, unknown> {
  const { $id: _id, ...schema } = JSON.parse(JSON.stringify(ErrorEnvelope)) as Record<string, unknown>
  return schema
}

export interface OpenApiOptions {
  /** PUBLIC_URL, when set: the document's server. */
  publicUrl: string | null
}

async function openApi (app: FastifyInstance, options: OpenApiOptions): Promise<void> {
  await app.register(swagger, {
    openapi: {
      openapi: '3.1.0',
      info: {
        title: 'Care360 patient BFF',
        version: '0.1.0',
        description: 'Backend-for-frontend for patient web and mobile apps on the Care360 Next API. ' +
          'Every answer is JSON in the envelope `{ status, success, message, code?, error?, data? }` (a CORS preflight, `OPTIONS`, is a 204 without a body; the web sign-in answers redirects, and this document is no envelope either); clients switch on `code`. ' +
          'Every answer carries `x-request-id`; every answer but those of `/healthz` and `/readyz`, CORS preflights and requests refused before routing carries `RateLimit-Policy` and `RateLimit`; API answers carry `cache-control: no-store`.'
      },
      ...(options.publicUrl === null ? {} : { servers: [{ url: options.publicUrl }] }),
      tags: [
        { name: 'appointments', description: "The signed-in patient's appointments" },
        { name: 'auth', description: 'Sign-in (web and mobile), session, sign-out' },
        { name: 'operations', description: 'Health, readiness and this document' }
      ],
      components: {
        securitySchemes: {
          bearer: { type: 'http', scheme: 'bearer', description: 'Mobile: the session token from `POST /auth/session`' },
          cookie: { type: 'apiKey', in: 'cookie', name: '__Host-bff-session', description: 'Web: the HttpOnly session cookie set by `/auth/callback`; state-changing requests also need `X-CSRF: 1`' }
        },
        schemas: {
          // The shared envelope once, referenced by every error answer.
          ErrorEnvelope: errorEnvelopeComponent()
        },
        // Once, referenced by every answer that carries them (answerHeaders).
        headers: ANSWER_HEADERS
      }
    },
    transform: describeRoute as never,
    transformObject: finishDocument as never
  })

  app.get(OPENAPI_PATH, {
    schema: {
      tags: ['operations'],
      summary: 'This OpenAPI 3.1 document',
      response: { 200: { description: 'The OpenAPI document', type: 'object', additionalProperties: true } }
    }
  }, async function openApiDocument () {
    return app.swagger()
  })
}

export const openApiPlugin = fp(openApi, { name: 'openapi', fastify: '5.x' })
