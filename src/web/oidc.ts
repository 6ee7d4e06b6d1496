import * as client from 'openid-client'
import { isLoopbackHost } from '../config.js'
import { IDP_FETCH_TIMEOUT_MS } from '../auth/key-set.js'

/**
 * The service as the web app's confidential OIDC client (openid-client). Discovery runs once, on
 * the first sign-in or web sign-out, and is cached; a failure is forgotten so the next one tries again.
 */

export interface WebClientSettings {
  issuer: string
  clientId: string
  clientSecret: string
  publicUrl: string
  /** The patient web app, where the IdP returns the browser after sign-out. */
  webAppUrl: string
}

export interface WebOidc {
  readonly clientId: string
  /** Built from PUBLIC_URL, never from a request's Host or X-Forwarded-* headers. */
  readonly redirectUri: string
  readonly postLogoutRedirectUri: string
  configuration: () => Promise<client.Configuration>
  /** The configuration if discovery has succeeded already, else null (nothing is fetched). */
  discovered: () => client.Configuration | null
}

/** Just the scopes the service needs: who (openid) and the verified email it acts for. */
export const WEB_SCOPES = 'openid email'

export function createWebOidc (settings: WebClientSettings): WebOidc {
  const issuer = new URL(settings.issuer)
  const execute = [
    // The ID token's signature is checked against the IdP's JWKS as well, not only the TLS channel.
    client.enableNonRepudiationChecks,
    // Plain http is accepted by config only for loopback issuers (development and tests).
    ...(issuer.protocol === 'http:' && isLoopbackHost(issuer.hostname) ? [client.allowInsecureRequests] : [])
  ]
  let pending: Promise<client.Configuration> | null = null
  let discovered: client.Configuration | null = null

  function configuration (): Promise<client.Configuration> {
    if (pending === null) {
      pending = client.discovery(issuer, settings.clientId, settings.clientSecret, client.ClientSecretPost(settings.clientSecret), {
        execute,
        timeout: IDP_FETCH_TIMEOUT_MS / 1000
      })
      pending.then(function keepDiscovery (found) { discovered = found }, function forgetFailedDiscovery () { pending = null })
    }
    return pending
  }

  return {
    clientId: settings.clientId,
    redirectUri: `${settings.publicUrl}/auth/callback`,
    postLogoutRedirectUri: settings.webAppUrl,
    configuration,
    discovered: () => discovered
  }
}
