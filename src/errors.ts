import { Type, type Static } from 'typebox'

/**
 * Machine-readable codes of the contract's answer table. Clients switch on these, never on
 * `message`, so they are fixed names.
 */
export const ErrorCode = {
  VALIDATION_FAILED: 'VALIDATION_FAILED',
  PAYLOAD_TOO_LARGE: 'PAYLOAD_TOO_LARGE',
  UNSUPPORTED_MEDIA_TYPE: 'UNSUPPORTED_MEDIA_TYPE',
  NOT_FOUND: 'NOT_FOUND',
  UPSTREAM_REJECTED: 'UPSTREAM_REJECTED',
  SESSION_REQUIRED: 'SESSION_REQUIRED',
  CSRF_REJECTED: 'CSRF_REJECTED',
  APPOINTMENT_NOT_FOUND: 'APPOINTMENT_NOT_FOUND',
  IDEMPOTENCY_IN_FLIGHT: 'IDEMPOTENCY_IN_FLIGHT',
  IDEMPOTENCY_MISMATCH: 'IDEMPOTENCY_MISMATCH',
  RATE_LIMITED: 'RATE_LIMITED',
  UPSTREAM_RATE_LIMITED: 'UPSTREAM_RATE_LIMITED',
  UPSTREAM_AUTH_FAILED: 'UPSTREAM_AUTH_FAILED',
  UPSTREAM_ERROR: 'UPSTREAM_ERROR',
  UPSTREAM_UNAVAILABLE: 'UPSTREAM_UNAVAILABLE',
  UPSTREAM_TIMEOUT: 'UPSTREAM_TIMEOUT',
  // Not in the contract's table, which leaves our own failures to us: a 500 always means a bug
  // of ours; a 503 means a dependency of ours (a store, the identity provider) could not answer
  // in time, or the replica is draining.
  INTERNAL_ERROR: 'INTERNAL_ERROR',
  SERVICE_UNAVAILABLE: 'SERVICE_UNAVAILABLE'
} as const

export type ErrorCode = typeof ErrorCode[keyof typeof ErrorCode]

/** The envelope of every error answer, as a schema so that OpenAPI and tests share it. */
export const ErrorEnvelope = Type.Object({
  status: Type.Integer(),
  success: Type.Literal(false),
  message: Type.String(),
  code: Type.String(),
  error: Type.Optional(Type.String())
}, { $id: 'ErrorEnvelope', additionalProperties: false })

export type ErrorEnvelope = Static<typeof ErrorEnvelope>

export interface ApiErrorOptions {
  cause?: unknown
  /** Extra headers for the answer, e.g. `Retry-After`. */
  headers?: Record<string, string>
  /** Upstream `error` text to pass through (already length-capped by the caller). */
  detail?: string
}

/**
 * A cause whose message is the service's own text (never a client's, the upstream's or a store's
 * words, nor a key, token or address): the error line of an answer logs it whole, where it logs
 * only the name and code of any other.
 */
export class OwnError extends Error {}

/**
 * An error whose status, code and message are safe to show to the client as they are. Anything
 * thrown that is not an ApiError is our bug and is answered as a bare 500.
 */
export class ApiError extends Error {
  readonly statusCode: number
  readonly code: ErrorCode
  readonly headers: Record<string, string>
  readonly detail: string | undefined

  constructor (statusCode: number, code: ErrorCode, message: string, options: ApiErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause })
    this.name = 'ApiError'
    this.statusCode = statusCode
    this.code = code
    this.headers = options.headers ?? {}
    this.detail = options.detail
  }

  toEnvelope (): ErrorEnvelope {
    return errorEnvelope(this.statusCode, this.code, this.message, this.detail)
  }
}

export function errorEnvelope (status: number, code: ErrorCode, message: string, detail?: string): ErrorEnvelope {
  const body: ErrorEnvelope = { status, success: false, message, code }
  if (detail !== undefined) body.error = detail
  return body
}

/** Success envelope: a route's own fields live under `data`. */
export function ok<T> (data: T, message = 'OK', status = 200): { status: number, success: true, message: string, data: T } {
  return { status, success: true, message, data }
}

/** A 401's challenge (RFC 9110, 15.5.2: a 401 carries one), for the mobile app's bearer token (RFC 6750). */
export const BEARER_CHALLENGE = { 'www-authenticate': 'Bearer' }

/** The challenge when the request's bearer token was refused (unknown, expired, ended): RFC 6750, 3.1. */
export const INVALID_TOKEN_CHALLENGE = { 'www-authenticate': 'Bearer error="invalid_token"' }

/** No session: `tokenRefused` when the request sent a bearer token, which its challenge then says. */
export const sessionRequired = (tokenRefused = false): ApiError =>
  new ApiError(401, ErrorCode.SESSION_REQUIRED, 'A valid session is required', { headers: tokenRefused ? INVALID_TOKEN_CHALLENGE : BEARER_CHALLENGE })
