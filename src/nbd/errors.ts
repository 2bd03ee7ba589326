/**
 * A peer broke the protocol in a way that leaves no error reply to send (a bad magic number, an
 * unknown client flag): the only answer is to drop the connection. Everything a client can get an
 * error reply for is answered with one instead and never becomes this error.
 */
export type NbdProtocolErrorCode =
  | 'NBD_BAD_MAGIC' // the stream is not at a message boundary any more
  | 'NBD_BAD_FLAGS' // client flags the server did not offer
  | 'NBD_TOO_BIG' // a message too large to skip or honour
  | 'NBD_BAD_REPLY'; // (client side) the server sent something malformed

export class NbdProtocolError extends Error {
  override readonly name = 'NbdProtocolError';
  constructor(
    readonly code: NbdProtocolErrorCode,
    message: string,
  ) {
    super(message);
  }
}
