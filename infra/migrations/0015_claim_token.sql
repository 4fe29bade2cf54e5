-- The claim that holds a message: a claim tried again after its reply was lost (the
-- connection dropped after the commit) finds the messages it had taken already, instead of
-- taking them for another worker's and waiting for their lease to end.
ALTER TABLE messages ADD COLUMN claim_token uuid;
