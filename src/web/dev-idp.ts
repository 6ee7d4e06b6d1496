/// <reference path="./oidc-provider.d.ts" />
import { randomBytes } from 'node:crypto'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import { once } from 'node:events'
import type { AddressInfo } from 'node:net'
import { exportJWK, generateKeyPair, type JWK } from 'jose'
import Provider from 'oidc-provider'

/**
 * A real OpenID Provider (oidc-provider) for development, the demo and the tests: the service's
 * web client registered the way the README tells operators to register it at their own IdP
 * (confidential client, code flow with PKCE, back-channel and RP-initiated logout). Sign-in is a
 * one-click page listing the demo accounts: no passwords, so never expose it beyond loopback.
 */

export interface DevAccount {
  /** The `sub` claim. */
  subject: string
  email: string
  name: string
  emailVerified: boolean
}

/** The sandbox's seeded patients (verified), and one unverified address for the refusal path. */
export const DEMO_ACCOUNTS: readonly DevAccount[] = Object.freeze([
  { subject: 'patient-alice', email: 'alice@example.com', name: 'Alice Patient', emailVerified: true },
  { subject: 'patient-bob', email: 'bob@example.com', name: 'Bob Patient', emailVerified: true },
  { subject: 'patient-carol', email: 'carol@example.com', name: 'Carol Patient', emailVerified: true },
  { subject: 'patient-unverified', email: 'unverified@example.com', name: 'Unverified Patient', emailVerified: false }
])

export interface DevIdpOptions {
  /** The BFF's PUBLIC_URL: redirect, post-logout and back-channel logout URIs derive from it. */
  publicUrl: string
  /** The patient web app (post-logout redirect); PUBLIC_URL by default. */
  webAppUrl?: string
  clientId?: string
  clientSecret?: string
  /** Extra public clients (e.g. a mobile app's), as oidc-provider client metadata. */
  extraClients?: Array<Record<string, unknown>>
  accounts?: readonly DevAccount[]
  /** An IPv4 address or a host name (default 127.0.0.1): the issuer URL is built from it. */
  host?: string
  /** RP-initiated logout (an end_session_endpoint); on by default. */
  endSession?: boolean
  /** `sid` in ID and logout tokens (back-channel logout by IdP session); on by default. */
  sid?: boolean
  /** 0 (default) picks a free port. */
  port?: number
}

export interface DevIdp {
  /** The issuer identifier, e.g. http://127.0.0.1:4000 */
  url: string
  clientId: string
  clientSecret: string
  /** The provider's signing keys, private parts included (tests sign crafted logout tokens). */
  signingKeys: JWK[]
  /** Back-channel logout deliveries, by outcome, as the provider reports them. */
  backchannel: { delivered: number, failed: number }
  close: () => Promise<void>
}

function escapeHtml (text: string): string {
  return text.replaceAll('&', '&amp;').replaceAll('<', '&lt;').replaceAll('>', '&gt;').replaceAll('"', '&quot;').replaceAll("'", '&#39;')
}

async function readForm (request: IncomingMessage): Promise<URLSearchParams> {
  let body = ''
  for await (const chunk of request) body += String(chunk)
  return new URLSearchParams(body)
}

function loginPage (uid: string, accounts: readonly DevAccount[]): string {
  const buttons = accounts.map((account) =>
    `<button name="account" value="${escapeHtml(account.email)}">${escapeHtml(account.name)} &lt;${escapeHtml(account.email)}&gt;</button>`
  ).join('\n')
  return `<!DOCTYPE html><html><head><meta charset="utf-8"><title>Development sign-in</title></head>
<body><h1>Development identity provider</h1><p>Sign in as:</p>
<form method="post" action="/interaction/${escapeHtml(uid)}">
${buttons}
<button name="deny" value="1">Deny</button>
</form></body></html>`
}

export async function startDevIdp (options: DevIdpOptions): Promise<DevIdp> {
  const clientId = options.clientId ?? 'patient-web'
  const clientSecret = options.clientSecret ?? randomBytes(24).toString('base64url')
  const accounts = options.accounts ?? DEMO_ACCOUNTS
  const publicUrl = options.publicUrl.replace(/\/+$/, '')
  const { privateKey } = await generateKeyPair('RS256', { extractable: true })
  const signingKeys = [{ ...await exportJWK(privateKey), kid: 'dev-idp-rs256', alg: 'RS256', use: 'sig' }]
  const backchannel = { delivered: 0, failed: 0 }

  // The issuer URL names the port, which is known only once listening; the handler is set
  // synchronously right after, before any request can arrive.
  let handle: ((request: IncomingMessage, response: ServerResponse) => void) | null = null
  const server: Server = createServer((request, response) => { (handle as NonNullable<typeof handle>)(request, response) })
  const host = options.host ?? '127.0.0.1'
  server.listen(options.port ?? 0, host)
  await once(server, 'listening')
  const url = `http://${host}:${(server.address() as AddressInfo).port}`

  const provider = new Provider(url, {
    clients: [{
      client_id: clientId,
      client_secret: clientSecret,
      client_name: 'Care360 patient BFF (web)',
      redirect_uris: [`${publicUrl}/auth/callback`],
      post_logout_redirect_uris: [(options.webAppUrl ?? publicUrl).replace(/\/+$/, '')],
      backchannel_logout_uri: `${publicUrl}/auth/backchannel-logout`,
      backchannel_logout_session_required: options.sid ?? true,
      grant_types: ['authorization_code'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_post'
    }, ...(options.extraClients ?? [])],
    jwks: { keys: signingKeys },
    cookies: { keys: [randomBytes(32).toString('base64url')] },
    // PKCE for every client, confidential ones included (OAuth 2.1, RFC 9700 section 2.1.1).
    pkce: { required: () => true },
    scopes: ['openid', 'email', 'profile'],
    // Short, explicit lifetimes (seconds): a development IdP keeps nothing for long.
    ttl: { Interaction: 600, Session: 3600, Grant: 3600, AccessToken: 600, AuthorizationCode: 60, IdToken: 600 },
    claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'] },
    // Real IdPs put the email claims of the granted scopes in the ID token; so does this one.
    conformIdTokenClaims: false,
    features: {
      devInteractions: { enabled: false },
      backchannelLogout: { enabled: true },
      rpInitiatedLogout: { enabled: options.endSession ?? true }
    },
    // oidc-provider refuses outgoing requests to special-use addresses (SSRF protection), which
    // would stop back-channel logout to a service on loopback: the one place this IdP ever runs.
    fetch: (url: string, init: RequestInit & { dispatcher?: unknown }) => {
      const { dispatcher: _ssrfGuard, ...rest } = init
      return globalThis.fetch(url, rest)
    },
    interactions: { url: (_ctx: unknown, interaction: { uid: string }) => `/interaction/${interaction.uid}` },
    findAccount: async function findAccount (_ctx: unknown, subject: string) {
      const account = accounts.find((candidate) => candidate.subject === subject)
      /* c8 ignore next -- only a session from before a restart with other accounts */
      if (account === undefined) return undefined
      return {
        accountId: subject,
        claims: async () => ({ sub: subject, email: account.email, email_verified: account.emailVerified, name: account.name })
      }
    }
  })
  provider.on('backchannel.success', () => { backchannel.delivered++ })
  provider.on('backchannel.error', () => { backchannel.failed++ })
  const providerHandler = provider.callback()

  async function interact (request: IncomingMessage, response: ServerResponse): Promise<void> {
    const details = await provider.interactionDetails(request, response)
    const params = details.params as { client_id: string, scope: string }
    async function grantFor (accountId: string): Promise<string> {
      const grant = new provider.Grant({ accountId, clientId: params.client_id })
      grant.addOIDCScope(params.scope)
      return await grant.save()
    }
    if (request.method === 'GET') {
      response.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' })
      response.end(loginPage(details.uid, accounts))
      return
    }
    const form = await readForm(request)
    const account = accounts.find((candidate) => candidate.email === form.get('account'))
    if (form.get('deny') !== null || account === undefined) {
      await provider.interactionFinished(request, response, { error: 'access_denied', error_description: 'End-User denied the request' }, { mergeWithLastSubmission: false })
      return
    }
    await provider.interactionFinished(request, response, {
      login: { accountId: account.subject },
      consent: { grantId: await grantFor(account.subject) }
    }, { mergeWithLastSubmission: false })
  }

  handle = function serveDevIdp (request, response) {
    if (request.url?.startsWith('/interaction/') === true) {
      interact(request, response).catch(function interactionFailed () {
        // Expired or unknown interaction: the user starts again from the app.
        if (!response.headersSent) response.writeHead(400, { 'content-type': 'text/plain' })
        response.end('interaction failed')
      })
      return
    }
    providerHandler(request, response)
  }

  async function close (): Promise<void> {
    if (!server.listening) return
    server.closeAllConnections()
    server.close()
    await once(server, 'close')
  }

  return { url, clientId, clientSecret, signingKeys, backchannel, close }
}
