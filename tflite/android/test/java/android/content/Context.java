package android.content;

import android.content.res.AssetManager;

/**
 * Host stand-in for {@code android.content.Context}, for testing on a JVM
 * without Android. It declares only the member EarlyExitClassifier uses, with
 * the real signature; it is not Android's implementation.
 */
public abstract class Context {
  /** Returns the assets of the application (the real method is abstract too). */
  public abstract AssetManager getAssets();
}
