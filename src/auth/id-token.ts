import { hash } from 'node:crypto'
import { errors, type JWTPayload } from 'jose'
import type { FastifyBaseLogger } from 'fastify'
import { ApiError, BEARER_CHALLENGE, ErrorCode } from '../errors.js'
import { identityProviderUnavailable, ProviderUnavailable, verifyWithKeySet, type IssuerKeys } from './key-set.js'
import type { ReplayGuard } from '../web/replay-guard.js'
import type { LogoutMarks } from './logout-marks.js'

/**
 * Verifies the OIDC ID tokens that mobile apps exchange for a session (contract: "ID tokens
 * accepted by POST /auth/session").
 */

export interface VerifiedIdToken {
  email: string
  subject: string
  issuer: string
  /** The IdP session (`sid`), for back-channel logout; null when the IdP does not send one. */
  sid: string | null
  /** `auth_time`, else `iat` (seconds): what a back-channel logout by subject is compared with. */
  authTime: number
}

/** A back-channel logout that took effect, as its verified logout token names it. */
export interface IdpLogout {
  issuer: string
  sid: string | null
  subject: string | null
  /** The logout token's `iat` (seconds): the IdP's clock, the one its ID tokens' `auth_time` is on. */
  at: number
}

/** A sign-in about to become a session, as its verified ID token names it. */
export interface SignInClaims {
  issuer: string
  subject: string
  sid: string | null
  /** `auth_time`, else `iat` (seconds). */
  authTime: number
}

export interface IdTokenVerifier {
  /** The token's identity, or a 401 (a 503 when the IdP's keys, or the store of retired tokens and logouts, are unreachable). */
  verify: (idToken: string) => Promise<VerifiedIdToken>
  /**
   * Retires an ID token by its id (`idTokenId`): `verify` refuses it from now on, for as long as
   * it could be accepted. So a token cannot become a session again once the patient signed out:
   * a web sign-in's, at its callback (it leaves the server as the `id_token_hint` of the IdP's
   * end-session URL: the browser's history, the IdP's logs); a mobile one's, when the session it
   * made is signed out (a copy left in the app, or taken from the device, would sign back in).
   */
  retire: (tokenId: string) => Promise<void>
  /**
   * A back-channel logout ended sessions here: from now on, for as long as a token from before it
   * could be accepted, `verify` and `loggedOut` refuse the ID tokens it ended. A logout by IdP
   * session (`sid`) ends that session's tokens (of its subject only, when it names one too); one
   * by subject alone, every token of the subject signed in at or before it. The same scope as the
   * sessions the logout ends: another IdP session of the same patient (another device) is not
   * this one's.
   */
  recordLogout: (logout: IdpLogout) => Promise<void>
  /** Whether a recorded logout ended this sign-in: a look, which writes nothing (503 when the store is unreachable). */
  loggedOut: (signIn: SignInClaims) => Promise<boolean>
}

export interface IdTokenVerifierOptions {
  /** The IdP's key set, shared with the back-channel logout verifier. */
  keys: IssuerKeys
  audiences: string[]
  now?: () => number
  log?: FastifyBaseLogger
  /** Where retired tokens are remembered (shared by the replicas when Redis is configured). */
  retired: ReplayGuard
  /** Where back-channel logouts are remembered (shared by the replicas when Redis is configured). */
  logouts: LogoutMarks
}

/**
 * Asymmetric algorithms only: `none` proves nothing, and an HMAC would be keyed with a secret we
 * do not share with the IdP (the classic alg-confusion attack uses a public key as that secret).
 */
export const ID_TOKEN_ALGORITHMS = ['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'ES256', 'ES384', 'ES512', 'EdDSA']

/** Longer than any real ID token: refused before it is parsed. */
export const MAX_ID_TOKEN_LENGTH = 8192

/** Token types that are JWTs but not ID tokens: an access or logout token is no sign-in. */
const FOREIGN_TYPES = new Set(['at+jwt', 'application/at+jwt', 'logout+jwt', 'application/logout+jwt'])

/**
 * The one refusal whose reason the patient can act on, told once the token is known to be the
 * identity provider's (its signature and claims checked): every other says only that the token
 * was refused, never which claim.
 */
const UNVERIFIED_EMAIL = 'Your email address is not verified with your sign-in provider: verify it there, then sign in again'

export const invalidIdToken = (cause?: unknown): ApiError =>
  new ApiError(401, ErrorCode.SESSION_REQUIRED, cause instanceof Rejected && cause.reason === 'email_verified' ? UNVERIFIED_EMAIL : 'Invalid ID token', {
    headers: BEARER_CHALLENGE,
    ...(cause === undefined ? {} : { cause })
  })

/**
 * The id under which an ID token is retired: fixed-size (tokens run to 8 KiB), so that the store
 * keeps ids, not tokens. Of the signed part only (header and payload, as sent): the signature's
 * own text can be respelled and still verify (base64url's spare bits, padding), while any change
 * to the signed part breaks the signature.
 */
export function idTokenId (idToken: string): string {
  return hash('sha256', idToken.slice(0, idToken.lastIndexOf('.')), 'base64url')
}

export function createIdTokenVerifier (options: IdTokenVerifierOptions): IdTokenVerifier {
  // The clocks' tolerance, and the oldest accepted `auth_time` (or `iat` without it), in seconds.
  const clockToleranceSec = 30
  const maxAgeSec = 600
  const now = options.now ?? Date.now
  const log = options.log
  // The longest any token stays acceptable from the moment it is seen: its auth_time (or iat) may
  // be up to the tolerance ahead, and it is refused once older than maxAge plus the tolerance.
  const acceptableForMs = (maxAgeSec + 2 * clockToleranceSec) * 1000
  // A logout's marks are named by hash, like the session store's indexes: no sid or subject in a
  // key or in memory.
  // `sid+sub`: a logout naming both, which ends that subject's tokens of that IdP session only.
  const markOf = (kind: 'sid' | 'sid+sub' | 'sub', issuer: string, value: string): string => hash('sha256', `${kind}\0${issuer}\0${value}`, 'base64url')
  const sidOfSubject = (sid: string, subject: string): string => `${sid}\0${subject}`

  async function loggedOut (signIn: SignInClaims): Promise<boolean> {
    const [sidMarked, sidOfSubjectMarked, subjectLoggedOutAt] = await Promise.all([
      signIn.sid === null ? null : options.logouts.markedAt(markOf('sid', signIn.issuer, signIn.sid)),
      signIn.sid === null ? null : options.logouts.markedAt(markOf('sid+sub', signIn.issuer, sidOfSubject(signIn.sid, signIn.subject))),
      options.logouts.markedAt(markOf('sub', signIn.issuer, signIn.subject))
    ])
    // At or after: a sign-in in the very second of the logout may have been the one it ended.
    return sidMarked !== null || sidOfSubjectMarked !== null || (subjectLoggedOutAt !== null && subjectLoggedOutAt >= signIn.authTime)
  }

  async function verify (idToken: string): Promise<VerifiedIdToken> {
    const identity = await verifySignedToken(idToken)
    // Looks only, after every other check: neither garbage nor ordinary sign-ins write to the
    // store (so none can push a retired token or a logout out of a bounded memory).
    const [retired, ended] = await Promise.all([
      options.retired.used(idTokenId(idToken)),
      loggedOut(identity)
    ])
    if (retired || ended) {
      log?.debug({ refusal: retired ? 'retired' : 'logged_out' }, 'ID token refused')
      throw invalidIdToken()
    }
    return identity
  }

  async function verifySignedToken (idToken: string): Promise<VerifiedIdToken> {
    if (typeof idToken !== 'string' || idToken.length === 0 || idToken.length > MAX_ID_TOKEN_LENGTH) {
      throw invalidIdToken()
    }
    try {
      const { issuer, keys } = await options.keys.resolve()
      const { payload, protectedHeader } = await verifyWithKeySet(idToken, keys, {
        issuer,
        // Any one of ours among the token's audiences.
        audience: options.audiences,
        algorithms: ID_TOKEN_ALGORITHMS,
        clockTolerance: clockToleranceSec,
        currentDate: new Date(now()),
        requiredClaims: ['exp', 'iat', 'sub']
      })
      if (typeof protectedHeader.typ === 'string' && FOREIGN_TYPES.has(protectedHeader.typ.toLowerCase())) {
        throw new Rejected('typ')
      }
      // A token with events is a Security Event Token (RFC 8417), a logout token among them, whose
      // typ is only recommended (Back-Channel Logout 1.0 §2.4): never a sign-in.
      if (payload.events !== undefined) throw new Rejected('events')
      const untrusted = untrustedAudience(payload, options.audiences)
      if (untrusted !== null) throw new Rejected(untrusted)
      return claimsOf(payload)
    } catch (error) {
      // Its error line is the 503's, with the causes (plugins/answers.ts: once a minute while the
      // provider is down).
      if (error instanceof ProviderUnavailable) throw identityProviderUnavailable(error)
      // The reason class only: never the token, never which claim to the client. Not under
      // `reason`, which the log's redaction paths censor (cancellation reasons).
      log?.debug({ refusal: reasonOf(error) }, 'ID token refused')
      throw invalidIdToken(error)
    }
  }

  function claimsOf (payload: JWTPayload): VerifiedIdToken {
    const nowSec = Math.floor(now() / 1000)
    // auth_time when present: the sign-in itself must be recent, not only the token's minting. One
    // that is no number (a provider's bug, a rewrite) is refused, not read as absent: iat alone
    // would let a silent refresh of an old sign-in through.
    const claimed = payload.auth_time
    if (claimed !== undefined && typeof claimed !== 'number') throw new Rejected('auth_time')
    const authTime = claimed ?? payload.iat as number
    const age = nowSec - authTime
    if (age > maxAgeSec + clockToleranceSec || age < -clockToleranceSec) throw new Rejected('age')
    if ((payload.iat as number) > nowSec + clockToleranceSec) throw new Rejected('iat')
    const { email, email_verified: emailVerified, sub, sid } = payload as JWTPayload & Record<string, unknown>
    if (typeof email !== 'string' || email.length > 254 || !email.includes('@')) throw new Rejected('email')
    if (emailVerified !== true) throw new Rejected('email_verified')
    if (typeof sub !== 'string' || sub === '') throw new Rejected('sub')
    return { email, subject: sub, issuer: payload.iss as string, sid: typeof sid === 'string' && sid !== '' ? sid : null, authTime }
  }

  return {
    verify,
    async retire (tokenId) {
      await options.retired.claim(tokenId, acceptableForMs)
      await options.retired.markUsed(tokenId)
    },
    loggedOut,
    async recordLogout ({ issuer, sid, subject, at }) {
      // By IdP session when named (that subject's, when the token names one too: Back-Channel
      // Logout 1.0, 2.7, the session identified by iss and sub and the sid), by subject otherwise
      // (a logout token names one or both): what the logout ends here too (src/web/backchannel.ts).
      // Kept as long as a token from before it could pass the age check: its auth_time is at most
      // the logout's iat, which the logout verifier keeps within the tolerance of now.
      if (sid !== null && subject !== null) await options.logouts.mark(markOf('sid+sub', issuer, sidOfSubject(sid, subject)), at, acceptableForMs)
      else if (sid !== null) await options.logouts.mark(markOf('sid', issuer, sid), at, acceptableForMs)
      else await options.logouts.mark(markOf('sub', issuer, subject as string), at, acceptableForMs)
    }
  }
}

/**
 * OIDC Core 3.1.3.7, for ID tokens and (Back-Channel Logout 2.6, 4: "in the same way") logout
 * tokens, once jose has found one of ours among the token's audiences: the claim that fails, or
 * null. The party the token was issued to (`azp`), when named, must be one of ours: a provider
 * that adds our client id to the audiences of tokens it mints for other clients would otherwise
 * let any of them sign a patient in here. Without `azp`, every audience must be one of ours
 * ("MUST be rejected if [...] it contains additional audiences not trusted by the Client";
 * oauth4webapi's rule for the web flow's ID tokens too).
 */
export function untrustedAudience (payload: JWTPayload, trusted: readonly string[]): 'azp' | 'aud' | null {
  if (payload.azp !== undefined) return typeof payload.azp === 'string' && trusted.includes(payload.azp) ? null : 'azp'
  if (!Array.isArray(payload.aud)) return null
  return payload.aud.every((audience) => trusted.includes(audience)) ? null : 'aud'
}

class Rejected extends Error {
  readonly reason: string
  constructor (reason: string) {
    super(`ID token refused: ${reason}`)
    this.name = 'Rejected'
    this.reason = reason
  }
}

function reasonOf (error: unknown): string {
  if (error instanceof Rejected) return error.reason
  if (error instanceof errors.JOSEError) return error.code
  /* c8 ignore next -- jose throws only JOSEErrors for a bad token; kept for the unexpected */
  return error instanceof Error ? error.name : 'unknown'
}
