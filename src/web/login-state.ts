import { hkdfSync } from 'node:crypto'
import { EncryptJWT, jwtDecrypt } from 'jose'
import { LOGIN_TTL_SEC } from './cookies.js'

/**
 * The login state of one browser between `/auth/login` and `/auth/callback`, sealed (AES-256-GCM)
 * into a cookie: no store write before sign-in, and any replica can open it. Encrypted, not only
 * signed, because it holds the PKCE verifier. The key is derived from the service's key root
 * (`Config.keyRoot`: SERVICE_SECRET, else the org API key) under its own HKDF label, so every
 * replica has it and the root itself is used for nothing else.
 */

export interface LoginState {
  state: string
  nonce: string
  codeVerifier: string
  returnTo: string
  /**
   * The id (never the token) of the session the browser had at `/auth/login`, ended when sign-in
   * succeeds: the session cookie is SameSite=Strict, so a browser leaves it off the identity
   * provider's cross-site redirect to `/auth/callback`, and only the same-site navigation to
   * `/auth/login` shows it.
   */
  previousSession?: string
}

/** A login state as the callback opens it. */
export interface OpenedLoginState extends LoginState {
  /** When `/auth/login` sealed it (seconds): the sign-in at the identity provider came after. */
  startedAt: number
}

export interface LoginStateSeal {
  seal: (state: LoginState) => Promise<string>
  /** Null when the value is missing, forged, from another deployment or expired. */
  open: (value: unknown) => Promise<OpenedLoginState | null>
}

export function createLoginStateSeal (root: string, now: () => number = Date.now): LoginStateSeal {
  const key = new Uint8Array(hkdfSync('sha256', root, Buffer.alloc(0), 'bff-web-login-state', 32))

  async function seal (state: LoginState): Promise<string> {
    const at = Math.floor(now() / 1000)
    return await new EncryptJWT({ s: state.state, n: state.nonce, v: state.codeVerifier, r: state.returnTo, ...(state.previousSession === undefined ? {} : { p: state.previousSession }) })
      .setProtectedHeader({ alg: 'dir', enc: 'A256GCM' })
      .setIssuedAt(at)
      .setExpirationTime(at + LOGIN_TTL_SEC)
      .encrypt(key)
  }

  async function open (value: unknown): Promise<OpenedLoginState | null> {
    if (typeof value !== 'string') return null
    try {
      const { payload } = await jwtDecrypt(value, key, {
        keyManagementAlgorithms: ['dir'],
        contentEncryptionAlgorithms: ['A256GCM'],
        currentDate: new Date(now()),
        requiredClaims: ['exp']
      })
      // Authenticated encryption: only seal() above can have written these fields.
      const { s, n, v, r, p } = payload as Record<string, string>
      const state: OpenedLoginState = { state: s as string, nonce: n as string, codeVerifier: v as string, returnTo: r as string, startedAt: payload.iat as number }
      if (p !== undefined) state.previousSession = p
      return state
    } catch {
      return null
    }
  }

  return { seal, open }
}
