import { createRemoteJWKSet, customFetch, errors, jwtVerify, type JWTVerifyGetKey, type JWTVerifyOptions, type JWTVerifyResult } from 'jose'
import { ApiError, ErrorCode, OwnError } from '../errors.js'
import { isLoopbackHost } from '../config.js'

/**
 * The identity provider's signing keys, one set for every verifier of its tokens (mobile ID
 * tokens, back-channel logout tokens): one discovery of its jwks_uri, one jose remote key set (so
 * one cache, and one refetch cooldown after an unknown `kid` however many verifiers ask), and one
 * rule for which failures are the IdP's (503) rather than the token's. What each token must claim
 * stays with its own verifier.
 */

/** The bound on one call to the identity provider (discovery, JWKS, the token endpoint). */
export const IDP_FETCH_TIMEOUT_MS = 5000

/**
 * The largest discovery document or key set read (real ones are a few KiB): a larger answer is
 * the IdP failing us (503), and is not read whole into memory.
 */
export const MAX_IDP_DOCUMENT_BYTES = 512 * 1024

export interface IssuerKeysOptions {
  issuer: string
  /** jose's JWKS refetch cooldown after an unknown `kid`; tests shorten it. */
  jwksCooldownMs?: number
  /** Deadline of one discovery or JWKS fetch. */
  fetchTimeoutMs?: number
}

export interface ResolvedIssuerKeys {
  /** The issuer as its discovery document names it: what a token's `iss` must equal. */
  issuer: string
  /** For jose's jwtVerify; rejects with ProviderUnavailable when the IdP fails us. */
  keys: JWTVerifyGetKey
  /** The provider's end_session_endpoint (RP-initiated logout), null when it publishes none. */
  endSessionEndpoint: string | null
}

export interface IssuerKeys {
  /** Discovery on first use, then cached; rejects with ProviderUnavailable (and is retried next time). */
  resolve: () => Promise<ResolvedIssuerKeys>
  /** What a discovery made already found; null before one succeeded (nothing waits on the IdP). */
  discovered: () => ResolvedIssuerKeys | null
}

/** The IdP itself failed us (discovery or JWKS unreachable, slow or garbage): not the token's fault. */
export class ProviderUnavailable extends OwnError {
  constructor (message: string, options?: { cause: unknown }) {
    super(message, options)
    this.name = 'ProviderUnavailable'
  }
}

/** The answer to a ProviderUnavailable, whichever token was being checked: a 503 to retry. */
export const identityProviderUnavailable = (cause: unknown): ApiError =>
  new ApiError(503, ErrorCode.SERVICE_UNAVAILABLE, 'Identity provider unavailable', { cause, headers: { 'retry-after': '5' } })

interface Discovery {
  issuer: string
  jwksUri: URL
  endSessionEndpoint: string | null
}

/** An https URL, or plain http on loopback (a development IdP's). */
export function isFetchableUrl (value: unknown): value is string {
  if (typeof value !== 'string') return false
  let url: URL
  try { url = new URL(value) } catch { return false }
  return url.protocol === 'https:' || (url.protocol === 'http:' && isLoopbackHost(url.hostname))
}

/**
 * fetch, with the answer's body read here up to MAX_IDP_DOCUMENT_BYTES (within the caller's
 * deadline, its signal): one over it rejects, its stream cancelled. Given to jose for the key set.
 */
async function boundedFetch (url: string | URL, init?: RequestInit): Promise<Response> {
  const response = await fetch(url, init)
  // No body (a 204, say): nothing to bound, and no body may be given back either.
  if (response.body === null) return response
  const chunks: Uint8Array[] = []
  let size = 0
  for await (const chunk of response.body) {
    size += chunk.byteLength
    // Leaving the loop cancels the stream: the rest is never read.
    if (size > MAX_IDP_DOCUMENT_BYTES) throw new OwnError(`identity provider answer over ${MAX_IDP_DOCUMENT_BYTES} bytes`)
    chunks.push(chunk)
  }
  return new Response(Buffer.concat(chunks), { status: response.status, statusText: response.statusText, headers: response.headers })
}

async function discover (issuer: string, timeoutMs: number): Promise<Discovery> {
  let document: { issuer?: unknown, jwks_uri?: unknown, end_session_endpoint?: unknown }
  try {
    const response = await boundedFetch(`${issuer}/.well-known/openid-configuration`, {
      signal: AbortSignal.timeout(timeoutMs),
      redirect: 'error',
      headers: { accept: 'application/json' }
    })
    if (response.status !== 200) {
      // Its body is not read: given back, so that its connection does not wait for the collector.
      await response.body?.cancel()
      throw new OwnError(`discovery answered ${response.status}`)
    }
    document = await response.json() as typeof document
  } catch (error) {
    throw new ProviderUnavailable('OIDC discovery failed', { cause: error })
  }
  // Config strips a trailing slash from OIDC_ISSUER; some IdPs (Auth0) publish it with one.
  if (typeof document.issuer !== 'string' || (document.issuer !== issuer && document.issuer !== `${issuer}/`)) {
    throw new ProviderUnavailable('OIDC discovery names another issuer')
  }
  if (!isFetchableUrl(document.jwks_uri)) throw new ProviderUnavailable('OIDC discovery has no usable jwks_uri')
  // RP-initiated logout's endpoint, when the provider has one (https, or http on loopback).
  const endSessionEndpoint = isFetchableUrl(document.end_session_endpoint) ? new URL(document.end_session_endpoint).href : null
  return { issuer: document.issuer, jwksUri: new URL(document.jwks_uri), endSessionEndpoint }
}

/**
 * Errors of the key set that are the IdP's doing (down, slow, garbage), as opposed to the token's:
 * no key for its `kid`, even after the refetch, is the token's.
 */
function isProviderFailure (error: unknown): boolean {
  if (!(error instanceof errors.JOSEError)) return true
  return error instanceof errors.JWKSTimeout || error instanceof errors.JWKSInvalid || error.code === 'ERR_JOSE_GENERIC'
}

export function createIssuerKeys (options: IssuerKeysOptions): IssuerKeys {
  const fetchTimeoutMs = options.fetchTimeoutMs ?? IDP_FETCH_TIMEOUT_MS
  let pending: Promise<ResolvedIssuerKeys> | null = null
  let resolved: ResolvedIssuerKeys | null = null

  /** Discovery once, cached; a failure is forgotten so the next token tries again. */
  function resolve (): Promise<ResolvedIssuerKeys> {
    if (pending === null) {
      pending = discover(options.issuer, fetchTimeoutMs).then(function keySet (discovery) {
        const remote = createRemoteJWKSet(discovery.jwksUri, {
          timeoutDuration: fetchTimeoutMs,
          [customFetch]: boundedFetch,
          ...(options.jwksCooldownMs === undefined ? {} : { cooldownDuration: options.jwksCooldownMs })
        })
        const keys: JWTVerifyGetKey = async function resolveKey (header, token) {
          try {
            return await remote(header, token)
          } catch (error) {
            throw isProviderFailure(error) ? new ProviderUnavailable('JWKS fetch failed', { cause: error }) : error
          }
        }
        resolved = { issuer: discovery.issuer, keys, endSessionEndpoint: discovery.endSessionEndpoint }
        return resolved
      })
      pending.catch(function forgetFailedDiscovery () { pending = null })
    }
    return pending
  }

  return { resolve, discovered: () => resolved }
}

/**
 * jose's jwtVerify against the IdP's key set, trying each key when the token's header names more
 * than one (no `kid`, which RFC 7515 leaves optional, while the IdP publishes two keys of its type,
 * as during a rotation): jose then reports them all (JWKSMultipleMatchingKeys) and leaves the
 * trying to its caller. The first key whose signature verifies decides (its claims checked as
 * usual); none verifying is the last key's signature failure.
 */
export async function verifyWithKeySet (token: string, keys: JWTVerifyGetKey, options: JWTVerifyOptions): Promise<JWTVerifyResult> {
  try {
    return await jwtVerify(token, keys, options)
  } catch (error) {
    if (!(error instanceof errors.JWKSMultipleMatchingKeys)) throw error
    let failure: unknown = error
    for await (const key of error) {
      try {
        return await jwtVerify(token, key, options)
      } catch (keyFailure) {
        if (!(keyFailure instanceof errors.JWSSignatureVerificationFailed)) throw keyFailure
        failure = keyFailure
      }
    }
    throw failure
  }
}
