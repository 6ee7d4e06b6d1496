import { createHmac, hkdfSync } from 'node:crypto'

/**
 * A keyed hash of the patient for log lines, so that one patient's requests can be correlated
 * without the email ever reaching a log. Keyed (not a bare SHA-256) because emails are guessable:
 * anyone could hash a list of addresses and match them. The key is derived from the service's key
 * root (`Config.keyRoot`: SERVICE_SECRET, else the org API key), which never leaves the server,
 * under its own HKDF label. The same hash scopes Idempotency-Key records (24 h), so a root that
 * changes (a rotated org key, without SERVICE_SECRET) re-keys both: logs of one patient no longer
 * correlate across the change, and records made before it are no longer found.
 *
 * Every authenticated request asks for its patient's ref, and the same patients ask again and
 * again: answers are remembered (a map lookup instead of an HMAC per request), up to `maxCached`
 * patients, after which the memory is emptied whole rather than kept in LRU order on the hot path.
 */
export function createPatientRef (root: string, maxCached = 10_000): (email: string) => string {
  const key = Buffer.from(hkdfSync('sha256', root, Buffer.alloc(0), 'patient-log-ref', 32))
  const known = new Map<string, string>()
  return function patientRef (email: string): string {
    let ref = known.get(email)
    if (ref === undefined) {
      ref = createHmac('sha256', key).update(email.toLowerCase()).digest('hex').slice(0, 32)
      if (known.size >= maxCached) known.clear()
      known.set(email, ref)
    }
    return ref
  }
}
