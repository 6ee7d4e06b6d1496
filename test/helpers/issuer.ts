import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import { once } from 'node:events'
import type { AddressInfo } from 'node:net'
import { randomUUID } from 'node:crypto'
import { SignJWT, exportJWK, generateKeyPair, type CryptoKey, type JWK } from 'jose'
import { rememberSecret } from './secrets.js'

/**
 * A tiny real OIDC issuer on 127.0.0.1, port 0: discovery and JWKS over HTTP, so tests exercise
 * the same fetch, cache and refetch paths as production. `sign()` makes a valid ID token unless
 * told otherwise.
 */

export type KeyName = 'rs256' | 'es256' | 'unknown' | 'rotated'

export interface SignOptions {
  /** Which key signs: `unknown` is never published, `rotated` only after `rotate()`. */
  key?: KeyName
  /** `none` (unsigned, crafted by hand) or `HS256` (keyed with `secret`). */
  alg?: 'none' | 'HS256'
  secret?: string
  /** Extra or replaced protected-header fields (e.g. `typ`). */
  header?: Record<string, unknown>
}

export interface IssuerBehaviour {
  /** Status of the discovery document (200 by default). */
  discoveryStatus: number
  /** The `issuer` the discovery document names (the real URL by default). */
  discoveryIssuer?: string
  /** Overrides the `jwks_uri` the discovery document names (null: none). */
  jwksUri?: string | null
  /** Overrides the `end_session_endpoint` the discovery document names (null: none). */
  endSessionEndpoint?: string | null
  /** Status of the JWKS (200 by default). */
  jwksStatus: number
  /** Replaces the JWKS document (e.g. something that is not a key set). */
  jwksBody?: unknown
  /** Extra members of the discovery document (e.g. a huge one). */
  discoveryExtra?: Record<string, unknown>
}

export interface TestIssuer {
  url: string
  /** The default audience of `sign()`. */
  clientId: string
  /** Valid by default; a claim set to `undefined` is removed. */
  sign: (claims?: Record<string, unknown>, options?: SignOptions) => Promise<string>
  /** Publishes the `rotated` key from now on. */
  rotate: () => void
  /** Requests served, by path. */
  hits: { discovery: number, jwks: number }
  behaviour: IssuerBehaviour
  close: () => Promise<void>
}

export interface IssuerOptions {
  clientId?: string
  now?: () => number
}

interface TeardownHost { teardown: (fn: () => unknown) => void }

interface KeyPair { kid: string, alg: 'RS256' | 'ES256', privateKey: CryptoKey, jwk: JWK }

async function keyPair (kid: string, alg: 'RS256' | 'ES256'): Promise<KeyPair> {
  const { privateKey, publicKey } = await generateKeyPair(alg, { extractable: true })
  const jwk = { ...await exportJWK(publicKey), kid, alg, use: 'sig' }
  return { kid, alg, privateKey, jwk }
}

const b64 = (value: unknown): string => Buffer.from(JSON.stringify(value)).toString('base64url')

/** RSA key generation is slow: one set of keys per test process, shared by its issuers. */
let keySet: Promise<Record<KeyName, KeyPair>> | undefined

async function generateKeys (): Promise<Record<KeyName, KeyPair>> {
  const [rs256, es256, unknown, rotated] = await Promise.all([
    keyPair('rs-1', 'RS256'),
    keyPair('es-1', 'ES256'),
    keyPair('never-published', 'RS256'),
    keyPair('rs-2', 'RS256')
  ])
  return { rs256, es256, unknown, rotated }
}

export async function startIssuer (t: TeardownHost, options: IssuerOptions = {}): Promise<TestIssuer> {
  const clientId = options.clientId ?? 'patient-mobile'
  const now = options.now ?? Date.now
  keySet ??= generateKeys()
  const keys = await keySet
  let rotated = false
  const hits = { discovery: 0, jwks: 0 }
  const behaviour: IssuerBehaviour = { discoveryStatus: 200, jwksStatus: 200 }
  let url = ''

  const server = createServer(function serveIssuer (request: IncomingMessage, response: ServerResponse) {
    const send = (status: number, body: unknown): void => {
      response.writeHead(status, { 'content-type': 'application/json' })
      response.end(JSON.stringify(body))
    }
    if (request.url === '/.well-known/openid-configuration') {
      hits.discovery++
      send(behaviour.discoveryStatus, {
        issuer: behaviour.discoveryIssuer ?? url,
        jwks_uri: behaviour.jwksUri === undefined ? `${url}/jwks` : behaviour.jwksUri,
        authorization_endpoint: `${url}/authorize`,
        token_endpoint: `${url}/token`,
        end_session_endpoint: behaviour.endSessionEndpoint === undefined ? `${url}/logout` : behaviour.endSessionEndpoint,
        id_token_signing_alg_values_supported: ['RS256', 'ES256'],
        ...behaviour.discoveryExtra
      })
      return
    }
    if (request.url === '/jwks') {
      hits.jwks++
      const published = [keys.rs256, keys.es256, ...(rotated ? [keys.rotated] : [])]
      send(behaviour.jwksStatus, behaviour.jwksBody ?? { keys: published.map((key) => key.jwk) })
      return
    }
    send(404, { error: 'not_found' })
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`

  async function sign (claims: Record<string, unknown> = {}, signOptions: SignOptions = {}): Promise<string> {
    const iat = Math.floor(now() / 1000)
    const payload: Record<string, unknown> = {
      iss: url,
      aud: clientId,
      sub: 'patient-subject-1',
      email: 'patient@example.com',
      email_verified: true,
      iat,
      exp: iat + 300,
      ...claims
    }
    for (const [name, value] of Object.entries(payload)) if (value === undefined) Reflect.deleteProperty(payload, name)
    if (signOptions.alg === 'none') {
      return `${b64({ alg: 'none', typ: 'JWT', ...signOptions.header })}.${b64(payload)}.`
    }
    if (signOptions.alg === 'HS256') {
      const secret = new TextEncoder().encode(signOptions.secret ?? 'a-shared-secret-of-sufficient-length!')
      return new SignJWT(payload).setProtectedHeader({ alg: 'HS256', typ: 'JWT', kid: keys.rs256.kid, ...signOptions.header }).sign(secret)
    }
    const key = keys[signOptions.key ?? 'rs256']
    const token = await new SignJWT(payload).setProtectedHeader({ alg: key.alg, typ: 'JWT', kid: key.kid, ...signOptions.header }).sign(key.privateKey)
    rememberSecret('ID token', token)
    return token
  }

  const close = async (): Promise<void> => {
    if (!server.listening) return
    server.closeAllConnections()
    server.close()
    await once(server, 'close')
  }
  t.teardown(close)

  return {
    url,
    clientId,
    sign,
    rotate: () => { rotated = true },
    hits,
    behaviour,
    close
  }
}

/** A token-shaped string with no meaning, for "garbage" cases. */
export function garbageToken (): string {
  return `${randomUUID()}.${randomUUID()}.${randomUUID()}`
}
