import { createHmac, hkdfSync } from 'node:crypto'

/**
 * A keyed hash of the patient for log lines, so that one patient's requests can be correlated
 * without the email ever reaching a log. Keyed (not a bare SHA-256) because emails are guessable:
 * anyone could hash a list of addresses and match them. The key is derived from the org API key,
 * which never leaves the server, under its own HKDF label so that the key itself is never used
 * for anything but talking to the upstream.
 */
export function createPatientRef (apiKey: string): (email: string) => string {
  const key = Buffer.from(hkdfSync('sha256', apiKey, Buffer.alloc(0), 'patient-log-ref', 32))
  return function patientRef (email: string): string {
    return createHmac('sha256', key).update(email.toLowerCase()).digest('hex').slice(0, 32)
  }
}
