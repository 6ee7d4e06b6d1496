import type { JWTPayload } from 'jose'
import type {} from '../auth/plugin.js'
import type { FastifyInstance, FastifySchema } from 'fastify'
import { Type } from 'typebox'
import { ApiError, ErrorCode, ok } from '../errors.js'
import { errorAnswers } from '../schemas/appointments.js'
import { ID_TOKEN_ALGORITHMS, untrustedAudience } from '../auth/id-token.js'
import { identityProviderUnavailable, ProviderUnavailable, verifyWithKeySet, type IssuerKeys } from '../auth/key-set.js'
import type { ReplayGuard } from './replay-guard.js'

/**
 * OpenID Connect Back-Channel Logout 1.0: the IdP POSTs a signed logout token when a user signs out
 * there (or an operator ends their session); we end the sessions it names in the shared store, so
 * on every replica at once.
 */

export const BACKCHANNEL_LOGOUT_EVENT = 'http://schemas.openid.net/event/backchannel-logout'

/** Logout tokens older than this are refused (the spec leaves the window to the RP). */
const MAX_AGE_SEC = 300
const CLOCK_TOLERANCE_SEC = 30
const MAX_TOKEN_LENGTH = 8192

/** Explicit types of other JWTs: an ID or access token is never a logout token. */
const ACCEPTED_TYPES = new Set(['jwt', 'logout+jwt', 'application/logout+jwt'])

export interface LogoutClaims {
  issuer: string
  subject: string | null
  sid: string | null
  /** The token's `iat` (seconds): when the IdP ended the session, on its own clock. */
  issuedAt: number
  /** The token's id is claimed in the replay guard: call this once its logout took effect. */
  markUsed: () => Promise<void>
}

export interface LogoutTokenVerifierOptions {
  /** The IdP's key set, shared with the mobile ID token verifier. */
  keys: IssuerKeys
  /** Every client id of ours at the IdP (web and mobile): the token's `aud` must name one. */
  audiences: string[]
  replayGuard: ReplayGuard
  now?: () => number
}

export class InvalidLogoutToken extends Error {
  readonly reason: string
  constructor (reason: string, options?: { cause: unknown }) {
    super(`logout token refused: ${reason}`, options)
    this.name = 'InvalidLogoutToken'
    this.reason = reason
  }
}

const invalidRequest = (): ApiError =>
  new ApiError(400, ErrorCode.VALIDATION_FAILED, 'Invalid logout token', { detail: 'invalid_request' })

function stringClaim (payload: JWTPayload, name: string): string | null {
  const value = payload[name]
  return typeof value === 'string' && value !== '' ? value : null
}

export function createLogoutTokenVerifier (options: LogoutTokenVerifierOptions): (token: string) => Promise<LogoutClaims> {
  const now = options.now ?? Date.now

  return async function verifyLogoutToken (token: string): Promise<LogoutClaims> {
    let payload: JWTPayload
    let type: string | undefined
    try {
      const { issuer, keys } = await options.keys.resolve()
      const verified = await verifyWithKeySet(token, keys, {
        issuer,
        audience: options.audiences,
        algorithms: ID_TOKEN_ALGORITHMS,
        clockTolerance: CLOCK_TOLERANCE_SEC,
        currentDate: new Date(now()),
        // Not `exp`: errata set 1 (2023) made it required, but the final text of 2022 did not,
        // and a provider conforming to that omits it; a refused logout would leave sessions
        // alive. jose checks `exp` when present, and `iat` within MAX_AGE_SEC plus the `jti`
        // replay guard bound such a token's life here anyway.
        requiredClaims: ['iat', 'jti', 'events']
      })
      payload = verified.payload
      type = verified.protectedHeader.typ
    } catch (error) {
      // Discovery or the JWKS failed: the IdP's fault, so a 503 it retries, never a refusal.
      if (error instanceof ProviderUnavailable) throw identityProviderUnavailable(error)
      // jose's own errors: the token is malformed, forged, expired or not for us.
      throw new InvalidLogoutToken(String((error as { code?: unknown }).code), { cause: error })
    }
    // A header the IdP signed may still hold anything: a typ that is not a string is refused, not a crash.
    if (type !== undefined && (typeof type !== 'string' || !ACCEPTED_TYPES.has(type.toLowerCase()))) throw new InvalidLogoutToken('typ')
    // aud as for ID tokens (section 2.6, step 4).
    const untrusted = untrustedAudience(payload, options.audiences)
    if (untrusted !== null) throw new InvalidLogoutToken(untrusted)
    const nowSec = Math.floor(now() / 1000)
    // Recent, and not from the future either: a token dated ahead would stay acceptable after the
    // replay guard below has forgotten its jti (which it keeps for the window counted from now).
    const iat = payload.iat as number
    if (iat < nowSec - MAX_AGE_SEC - CLOCK_TOLERANCE_SEC || iat > nowSec + CLOCK_TOLERANCE_SEC) throw new InvalidLogoutToken('iat')
    const event = (payload.events as Record<string, unknown> | null)?.[BACKCHANNEL_LOGOUT_EVENT]
    // A JSON object (section 2.4), possibly empty: not an array, which typeof calls an object too.
    if (typeof event !== 'object' || event === null || Array.isArray(event)) throw new InvalidLogoutToken('events')
    // A nonce marks an ID token: never accepted as a logout token (spec section 2.6, step 5).
    if ('nonce' in payload) throw new InvalidLogoutToken('nonce')
    const subject = stringClaim(payload, 'sub')
    const sid = stringClaim(payload, 'sid')
    if (subject === null && sid === null) throw new InvalidLogoutToken('sub_or_sid')
    const jti = stringClaim(payload, 'jti')
    if (jti === null) throw new InvalidLogoutToken('jti')
    const issuer = payload.iss as string
    const id = `${issuer}\0${jti}`
    // Remembered for as long as the token could pass the iat check above.
    if (!await options.replayGuard.claim(id, (MAX_AGE_SEC + 2 * CLOCK_TOLERANCE_SEC) * 1000)) {
      throw new InvalidLogoutToken('replay')
    }
    return { issuer, subject, sid, issuedAt: iat, markUsed: () => options.replayGuard.markUsed(id) }
  }
}

export interface BackchannelRouteOptions {
  verify: (token: string) => Promise<LogoutClaims>
}

/**
 * The route, in its own encapsulated context: the only place where a form-encoded body is parsed
 * (the rest of the API is JSON only, which keeps "simple" cross-site requests out).
 */
export async function backchannelLogoutRoute (app: FastifyInstance, options: BackchannelRouteOptions): Promise<void> {
  app.addContentTypeParser('application/x-www-form-urlencoded', { parseAs: 'string' }, function parseForm (_request, body, done) {
    const tokens = new URLSearchParams(body as string).getAll('logout_token')
    // A repeated parameter is ambiguous: refused rather than picking one.
    done(null, { logout_token: tokens.length === 1 ? tokens[0] : undefined })
  })

  // OpenAPI fields (tags, consumes) beside the validation ones, as the other routes have them. The
  // body's schema describes the form for the document; the handler checks it itself
  // (attachValidation), so that every malformed request gets the spec's 400 invalid_request.
  const schema: FastifySchema = {
    tags: ['auth'],
    summary: 'OIDC Back-Channel Logout 1.0: the identity provider ends sessions (server to server)',
    consumes: ['application/x-www-form-urlencoded'],
    body: Type.Object({ logout_token: Type.String({ description: 'A logout token signed by the identity provider (a JWT)' }) }),
    response: {
      200: Type.Object({ status: Type.Integer(), success: Type.Literal(true), message: Type.String(), data: Type.Object({}) }, { description: 'The sessions the token names are ended (also when there were none)' }),
      ...errorAnswers(400, 503)
    }
  } as FastifySchema
  // `RATE_LIMIT_IP` counts only refused logout tokens here: an identity provider sends every logout
  // from its own few addresses, and a valid one dropped by the limit would leave sessions alive
  // after the patient signed out (the provider does not retry). Garbage still uses up the address's
  // quota, after which everything from it is refused before verification.
  // The form's limit is the route's, so that a client expecting 100 Continue is invited by it (answers.ts).
  app.post('/auth/backchannel-logout', { schema, attachValidation: true, bodyLimit: MAX_TOKEN_LENGTH + 1024, config: { ipLimit: 'refusals' } }, async function backchannelLogout (request) {
    const token = (request.body as { logout_token?: unknown } | undefined)?.logout_token
    if (typeof token !== 'string' || token.length === 0 || token.length > MAX_TOKEN_LENGTH) throw invalidRequest()
    let claims: LogoutClaims
    try {
      claims = await options.verify(token)
    } catch (error) {
      if (!(error instanceof InvalidLogoutToken)) throw error
      // `refusal`, not `reason`: the redaction paths censor every `reason` (cancellation reasons).
      request.log.info({ refusal: error.reason }, 'logout token refused')
      throw invalidRequest()
    }
    // The ID tokens from before the logout can no longer be exchanged for a new session (mobile
    // re-sign-in with a cached token, a stolen copy, a web sign-in still in flight). Recorded
    // before the sessions end: a sign-in checked after this is refused, one created before the
    // revoke below is ended by it, and one checked before this and created after the revoke read
    // its index sees this mark when it looks again after creating its session, and ends it
    // (auth/sign-in.ts).
    // By IdP session when named (the precise one: that subject's only, when it names one too,
    // Back-Channel Logout 1.0, 2.7); by subject otherwise: all of that user's sessions.
    // A store failure here answers 503 and leaves the token's id claimed but not used, so that the
    // IdP's retry of the same token is carried out, not refused as a replay.
    await app.idTokenVerifier.recordLogout({ issuer: claims.issuer, sid: claims.sid, subject: claims.subject, at: claims.issuedAt })
    const ended = claims.sid !== null
      ? await app.sessions.revokeByIdpSession(claims.issuer, claims.sid, claims.subject)
      : await app.sessions.revokeBySubject(claims.issuer, claims.subject as string)
    request.log.info({ ended, by: claims.sid !== null ? 'sid' : 'sub' }, 'back-channel logout')
    try {
      await claims.markUsed()
    } catch (error) {
      // The logout took effect: the IdP is told so. Until the claim expires a replay of this token
      // would end the subject's newer sessions as well, which an operator should know about.
      request.log.warn({ err: { name: (error as Error).name, message: (error as Error).message } }, 'back-channel logout: its token id could not be marked used')
    }
    return ok({}, 'Logged out')
  })
}
